"""Public ops (autograd + torch.library) over the Triton, CUDA, CPU and reference backends."""
