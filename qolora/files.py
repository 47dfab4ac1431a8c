"""The file and folder names QOLoRA writes, each listed once: the adapter dir's (``adapter_dir``) and
the training run folder's (``training.run_dir``). A module below both reads them here, so neither
reaches into the other."""

from __future__ import annotations

# adapter dir (qolora/adapter_dir.py)
META_FILE = "qolora.json"
FACTORS_FILE = "initial_factors.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's
WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's

# training run folder (qolora/training/run_dir.py)
RUN_CONFIG_FILE = "config.yaml"  # the resolved config
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"
INITIAL_ADAPTER = "initial_adapter"  # the OLoRA init, written once (rank 0), rebuilt by the others and a resume
FINAL_ADAPTER = "adapter"  # only a finished run writes it
LOCK_FILE = ".qolora-run.lock"
