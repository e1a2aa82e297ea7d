"""Forward hooks that keep a model's intermediate tensors for the layer-wise losses: the embedding output and each
layer's output (the hidden states), and the query / key / value projections of chosen layers. Whoever runs the
model (the objective's own forward, the streaming MLM head's), the taps see it, so no recipe has to change how it
calls the models; the teacher's are taken under no_grad like the rest of its forward."""

from __future__ import annotations

from torch import Tensor, nn

from fastdistil.models import attention_parts, encoder, encoder_layers

PROJECTIONS = ("q", "k", "v")


class Taps:
    """taps = Taps(model, hidden=[0, 3], projections={2: ("q", "k")}); model(...); taps.hidden[3], taps.qkv[2]["q"].

    hidden: hidden-state indices, 0 = the embedding output, i = the output of layer i - 1 (transformers'
            output_hidden_states numbering). projections: layer index -> which of q, k, v to keep, each (B, L, H).
    Call clear() after the losses are computed, so that nothing outlives its step."""

    def __init__(self, model: nn.Module, hidden=(), projections: dict | None = None):
        self.hidden: dict[int, Tensor] = {}
        self.qkv: dict[int, dict[str, Tensor]] = {}
        self._handles = []
        layers = encoder_layers(model)
        for index in sorted(set(hidden)):
            module = encoder(model).embeddings if index == 0 else layers[index - 1]
            self._handles.append(module.register_forward_hook(self._keep_hidden(index)))
        for layer, names in (projections or {}).items():
            _, q, k, v, _ = attention_parts(layers[layer])
            for name in names:
                linear = {"q": q, "k": k, "v": v}[name]
                self._handles.append(linear.register_forward_hook(self._keep_projection(layer, name)))

    def _keep_hidden(self, index: int):
        def hook(module, args, output):
            self.hidden[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def _keep_projection(self, layer: int, name: str):
        def hook(module, args, output):
            self.qkv.setdefault(layer, {})[name] = output

        return hook

    def clear(self) -> None:
        self.hidden.clear()
        self.qkv.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()
