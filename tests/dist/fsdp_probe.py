"""Run under torchrun (2 gloo ranks): a QOLoRA 4-bit model sharded by FSDP2's ``fully_shard``, as
accelerate wraps a Llama (each decoder layer, then the root), with quant storage = compute dtype.

    torchrun --standalone --nproc_per_node 2 tests/dist/fsdp_probe.py MODEL_DIR OUT_DIR

Each rank writes OUT_DIR/rank<R>.json: its parameter bytes before and after sharding, its
quant_state bytes, whether the loss and the gathered gradients under FSDP equal the unsharded
model's, whether the packed bytes (NaN bit patterns included) survive shard -> unshard, and, on
rank 0, whether the full state dict holds the whole adapter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    import bitsandbytes as bnb
    from peft import LoraConfig
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    import qolora
    from qolora import quant
    from qolora.quant.loading import bnb_config

    model_dir, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dtype = torch.float32  # compute dtype on the CPU; the quant storage is the same (FSDP-QLoRA)
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb_config(dtype, quant_storage=dtype), dtype=dtype, device_map={"": "cpu"}
    )
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="olora")
    model = qolora.get_qolora_model(base, cfg, progress=False)
    layers4 = {n: m for n, m in model.named_modules() if quant.is_4bit(m)}
    packed = {n: m.weight.data.view(torch.int32).flatten().clone() for n, m in layers4.items()}
    nan_patterns = sum(int(torch.isnan(m.weight.data).sum()) for m in layers4.values())
    stats = 0
    for m in layers4.values():
        qs = m.weight.quant_state
        stats += qs.absmax.numel() * qs.absmax.element_size() + qs.state2.absmax.numel() * 4 + 4
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    x = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=x, labels=x).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    from qolora.training.harness import grad_norm

    ref_norm = grad_norm(model)
    model.zero_grad(set_to_none=True)

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    params = list(model.parameters())
    local_bytes = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in params)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads_equal = all(
        torch.equal(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad, ref_grads[n])
        for n, p in model.named_parameters()
        if p.requires_grad
    )
    norm = grad_norm(model)  # a collective: the shards' squares summed over ranks
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    adapter = {k: v for k, v in sd.items() if "lora_" in k}
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
    after = {n: m.weight.data.view(torch.int32).flatten() for n, m in layers4.items()}
    deq_same = all(
        torch.equal(
            bnb.functional.dequantize_4bit(m.weight.data.view(-1, 1), m.quant_state),
            bnb.functional.dequantize_4bit(packed[n].view(torch.float32).view(-1, 1), m.quant_state),
        )
        for n, m in layers4.items()
    )
    result = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "full_param_bytes": full_bytes,
        "local_param_bytes": local_bytes,
        "quant_stats_bytes": stats,
        "sharded_params": sum(isinstance(p, DTensor) for p in params),
        "params": len(params),
        "nan_bit_patterns_in_packed": nan_patterns,
        "packed_bit_identical_after_unshard": all(torch.equal(packed[n], after[n]) for n in packed),
        "dequantized_bit_identical_after_unshard": deq_same,
        "loss_equal": bool(torch.equal(loss.detach(), ref.detach())),
        "grads_equal": grads_equal,
        "grad_norm_rel_diff": abs(norm - ref_norm) / ref_norm,
        "adapter_keys": len(adapter),
        "adapter_full_and_equal": rank != 0
        or (set(adapter) == set(lora) and all(torch.equal(adapter[k].cpu(), lora[k]) for k in lora)),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
