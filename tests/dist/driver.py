"""``qolora train``, under a launcher or alone, with one fault injected (tests/test_distributed.py,
tests/test_faults.py).

FAULT=perturb: rank 1's 4-bit residual of one layer is moved after it is rebuilt (under fsdp:
               after it arrives from rank 0, one bit of its packed bytes).
FAULT=config:  rank 1 gets another train.lr.
FAULT=kill:    rank 1 kills itself with SIGKILL right after checkpoint-4 is saved.
FAULT=signal:  the process sends itself $SIGNAL (SIGTERM, SIGINT) as step 4 begins, from outside the loop
               (only rank $SIGNAL_RANK, if set).
FAULT=pause:   at step 2 the run touches $PAUSED and waits for $GO to exist: a run busy training.

NO_WEIGHT_READS=1: every rank but 0 fails the run if it opens the model's weights (transformers'
``from_pretrained``, QOLoRA's checkpoint stream).
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

import qolora.fsdp
import qolora.quant.source
import qolora.training.run as run
from qolora import cli, quant

rank = int(os.environ.get("RANK", 0))
fault = os.environ.get("FAULT", "")
argv = sys.argv[1:]


def add_callback(callback: TrainerCallback) -> None:
    build = run.build_trainer

    def build_with_callback(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(callback)
        return trainer

    run.build_trainer = build_with_callback


if os.environ.get("NO_WEIGHT_READS") and rank != 0:
    import transformers

    def refuse(*a, **k):
        raise RuntimeError(f"rank {rank} read model weights: {a[1:2]}")

    transformers.PreTrainedModel.from_pretrained = classmethod(refuse)
    qolora.quant.source.safe_open = refuse

if fault == "perturb":
    install = qolora.fsdp._install_
    target = "layers.1.mlp.up_proj.base_layer.weight"

    def install_perturbed(model, entries, flat):
        install(model, entries, flat)
        name = next((n for e in entries for n in e["names"] if n.endswith(target)), None)
        if rank == 1 and name:
            model.get_submodule(name.removesuffix(".weight")).weight.data.view(-1).view(torch.uint8)[0] ^= 1

    qolora.fsdp._install_ = install_perturbed
    load = run.load_adapter

    def load_perturbed(*a, **k):
        model = load(*a, **k)
        if rank == 1:
            layer = model.base_model.model.model.layers[1].mlp.up_proj.base_layer
            W = quant.dequantize(layer)
            W[0, 0] += 1.0
            quant.requantize_(layer, W)
        return model

    run.load_adapter = load_perturbed
elif fault == "config" and rank == 1:
    argv.append("train.lr=0.02")
elif fault == "kill":

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4 and rank == 1:
                Path(args.output_dir, "killed_at").write_text(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)

    add_callback(KillAfterSave())
elif fault == "signal":

    class SignalInStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 3 and os.environ.get("SIGNAL_RANK", str(rank)) == str(rank):
                os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))

    add_callback(SignalInStep())
elif fault == "pause":

    class Pause(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                Path(os.environ["PAUSED"]).touch()
                while not Path(os.environ["GO"]).exists():
                    time.sleep(0.05)

    add_callback(Pause())

sys.exit(cli.main(argv))
