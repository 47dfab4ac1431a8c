"""The names a user can choose, each listed once: config fields, CLI flags and checks read them here."""

from __future__ import annotations

INITS = ("olora", "pissa", "loftq", "lora")
FACTORED_INITS = ("olora", "pissa", "loftq")  # the adapter starts from factors of W; the base holds a residual
INIT_SOURCES = ("auto", "checkpoint", "dequantized")  # where OLoRA's W comes from (initialize.WeightSource)
QUANT_TYPES = ("nf4", "fp4", "none")
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch")  # paged_* need CUDA
TRAIN_OPTIMIZERS = ("auto", *OPTIMIZERS)  # auto: paged 8-bit on CUDA, torch AdamW on CPU
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")  # llama.cpp tensor types `qolora export gguf` writes
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")  # train.report_to: the Trainer integrations offered
DISTRIBUTED_MODES = ("auto", "ddp", "fsdp")  # train.distributed: auto is ddp above one process
DATA_FORMATS = (  # detection order (training/formats.py)
    "chat",
    "sharegpt_preference",
    "sharegpt",
    "preference",
    "kto",
    "alpaca",
    "prompt_completion",
    "text",
)
PREFERENCE_METHODS = ("dpo", "ipo", "orpo", "kto", "simpo")  # TRL's trainers (training/preference.py)
METHODS = ("sft", *PREFERENCE_METHODS, "grpo")  # train.method; grpo: online RL (training/preference.py)
