"""The precisions a prediction can run the network in. Without a torch import: the CLI's help and the widget's
forms read them before torch is loaded; ``devices.prediction_dtype`` turns one into an autocast dtype."""

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
"""auto: float16 on a CUDA GPU, bfloat16 on a CPU where it measured faster (``devices.cpu_bfloat16_pays``), float32
otherwise; or one of the three named."""
