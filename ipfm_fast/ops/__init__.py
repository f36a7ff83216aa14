"""Public ops over the Triton, CUDA, CPU and reference backends, one file per op (kernel ->
launcher -> leaf custom op + autograd.Function -> public function); the shape they share is
written once in _op.py, the host-side launch helpers in _launch.py, the input rules in
ipfm_fast/_checks.py."""
