"""Running a .pte: on this machine (ExecuTorch's Python runtime) and, later, on devices."""
