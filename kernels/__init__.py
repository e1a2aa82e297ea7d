"""Triton kernels, installed as fastdistil.kernels (see setup.py). They implement; the op files in
fastdistil/ops/ decide when they run. Tested on CPU under TRITON_INTERPRET=1, on small shapes."""
