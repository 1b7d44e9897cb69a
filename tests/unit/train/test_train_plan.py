"""What the `auto` knobs become (train/fast_path.py), on this CPU and on a GPU as torch.cuda reports one."""
from __future__ import annotations

import pytest

from recipes.sections.train import TrainSection


def _llama_1b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256)


@pytest.fixture
def h200(monkeypatch):
    """torch.cuda answering like an H200 with `free` bytes free (no kernel runs: plan_run only asks)."""
    import torch

    def gpu(free_gib: float = 140.0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (int(free_gib * 2**30), 143 * 2**30))

    return gpu


def test_cpu_plan_is_plain_and_the_gpu_knobs_can_be_forced_for_tests():
    from train.fast_path import cpu_has_bf16_units, plan_run

    plan = plan_run(TrainSection(), _llama_1b())
    cpu_dtype = "bfloat16" if cpu_has_bf16_units() else "float32"  # bfloat16 where the CPU multiplies it in hardware
    assert (plan.device, plan.dtype, plan.packing, plan.attention) == ("cpu", cpu_dtype, False, "sdpa")
    assert plan_run(TrainSection(precision="float32"), _llama_1b()).dtype == "float32"
    assert not plan.compile and plan.token_budget == 0 and not plan.gradient_checkpointing
    forced = plan_run(TrainSection(packing=True, attention="varlen", compile=True, batch_size=2, max_seq_len=96),
                      _llama_1b())
    assert forced.attention == "varlen" and forced.compile and forced.token_budget == 192
    assert forced.compile_backend in ("inductor", "aot_eager")


def test_bad_combinations_are_refused_by_name():
    from train.fast_path import plan_run
    from workbench.workspace import StageError

    with pytest.raises(StageError, match="attention: varlen .* needs packing"):
        plan_run(TrainSection(attention="varlen", packing=False), _llama_1b())
    with pytest.raises(StageError, match="token_budget: true .* needs packing"):
        plan_run(TrainSection(token_budget=True, packing=False), _llama_1b())


def test_gpu_auto_plan_is_varlen_compiled_over_a_fixed_budget(h200):
    from train.fast_path import check_fast_path, plan_run

    h200()
    section = TrainSection(batch_size=4, max_seq_len=2048, dropout=0.0)
    plan = plan_run(section, _llama_1b())
    assert (plan.device, plan.dtype, plan.packing, plan.attention) == ("cuda", "bfloat16", True, "varlen")
    assert plan.compile and plan.token_budget == 8192 and not plan.liger_kernels
    assert not plan.gradient_checkpointing and plan.lora_dropout_extra_mib == 0
    # QLoRA stays eager; without compiling there is no budget to pad to
    qlora = plan_run(TrainSection(method="qlora", batch_size=4, max_seq_len=2048), _llama_1b())
    assert qlora.attention == "varlen" and not qlora.compile and qlora.token_budget == 0
    assert not any("dropout" in n for n in check_fast_path(plan))


def test_lora_dropout_memory_is_reported_and_counted_for_checkpointing(h200):
    from train.fast_path import check_fast_path, plan_run

    section = TrainSection(batch_size=4, max_seq_len=2048, dropout=0.05)
    h200()
    plan = plan_run(section, _llama_1b())
    # 16 layers x (6 x 2048 + 8192) adapted inputs x (2 bytes + 1 mask byte) x 8192 tokens
    assert plan.lora_dropout_extra_mib == pytest.approx(16 * (6 * 2048 + 8192) * 3 * 8192 / 2**20, abs=0.1)
    assert any("dropout" in n and "7680 MiB" in n for n in check_fast_path(plan))
    # with 27 GiB free the activations fit without the dropout copies (0.8 x 27 > 2.5 + 18 GiB) but not with them
    h200(free_gib=27)
    assert not plan_run(section.model_copy(update={"dropout": 0.0}), _llama_1b()).gradient_checkpointing
    assert plan_run(section, _llama_1b()).gradient_checkpointing
