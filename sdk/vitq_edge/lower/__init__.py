"""Lowering: torch.export -> ExecuTorch edge dialect -> XNNPACK delegate -> .pte bytes."""
