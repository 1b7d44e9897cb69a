"""The fixed token budget (every packed micro-step the same shapes, padding never trained on or counted) and the
compiled decoder layers it is for: through the real train path, the layers compile in the first step only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._train_helpers import make_clean


def _rows(lengths_per_row: list[list[int]]) -> list[dict]:
    """Packed rows as trl's BFD packing leaves them: input_ids plus each conversation's length."""
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 512, (sum(lens),), generator=g).tolist(), "seq_lengths": lens}
            for lens in lengths_per_row]


def test_every_packed_batch_gets_the_budget_shapes_and_the_padding_is_masked_and_uncounted():
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from train.budget import TokenBudget
    from train.tracking import TokenCounter

    counter = TokenCounter(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    budget = TokenBudget(counter, rows=2, max_seq_len=64, max_conversations_per_row=3, pad_token_id=0)
    batches = [_rows([[20, 30, 10], [64]]), _rows([[5, 7], [40]]), _rows([[3]]), _rows([[64], [64]])]
    shapes = set()
    for rows in batches:
        real = sum(sum(r["seq_lengths"]) for r in rows)
        before = counter.tokens
        out = budget(rows)
        assert counter.tokens - before == real  # the counter sees trl's batch, not the padding
        shapes.add(tuple((k, tuple(v.shape)) for k, v in sorted(out.items()) if torch.is_tensor(v)))
        assert out["max_length_q"] == out["max_length_k"] == 64
        cu = out["cu_seq_lens_q"]
        assert cu.dtype == torch.int32 and cu.numel() == 2 * (3 + 1) + 1 and int(cu[-1]) == 128
        lengths = cu.diff()
        assert int(lengths.max()) <= 64 and bool((lengths >= 0).all())
        # every padding token is masked and restarts its positions: a conversation of its own
        assert bool((out["labels"][0, real:] == -100).all()) and bool((out["input_ids"][0, real:] == 0).all())
        starts = (out["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert starts == cu[:-1][lengths > 0].tolist()
    assert len(shapes) == 1
    assert budget.padded_tokens == 4 * 128 - counter.tokens


def test_padding_to_the_budget_leaves_the_loss_unchanged(tmp_path):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from recipes.sections.train import TrainSection
    from tests.unit.train.test_train_packing import _cpu_plan, _tiny_llama
    from train.budget import TokenBudget
    from train.build import load_base_model

    _tiny_llama(tmp_path, torch.float32)
    model = load_base_model(tmp_path, TrainSection(method="lora"), _cpu_plan("varlen")).eval()
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    rows = _rows([[37, 5, 60], [120]])
    with torch.no_grad():
        plain = float(model(**collator(rows), use_cache=False).loss)
        padded = float(model(**TokenBudget(collator, 3, 128, 4, 0)(rows), use_cache=False).loss)
    assert padded == pytest.approx(plain, rel=1e-6)


COMPILED_TRAIN = {"max_steps": 8, "batch_size": 2, "max_seq_len": 96, "save_steps": 100, "logging_steps": 1,
                  "learning_rate": 0.003, "warmup_ratio": 0.0, "heldout_max_records": 2, "dropout": 0.0,
                  "packing": True, "attention": "varlen", "compile": True}


def _train_compiled(make_recipe, run_cli, tiny_model_dir, name: str, **train) -> tuple[dict, Path]:
    recipe = make_recipe(base_dir=tiny_model_dir, name=name, train={**COMPILED_TRAIN, **train})
    make_clean(recipe, n_train=40)
    # aot_eager: dynamo traces and autograd splits the same graphs as with inductor, without generating kernels
    proc = run_cli("-m", "train", str(recipe), env={"TRAIN_COMPILE_BACKEND": "aot_eager"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = recipe.parent / "runs" / name / "train"
    return json.loads((out / "metrics.json").read_text()), recipe


def test_compiled_layers_compile_once_over_varied_packing_and_recompile_without_the_budget(
        tiny_model_dir, make_recipe, run_cli):
    metrics, recipe = _train_compiled(make_recipe, run_cli, tiny_model_dir, "once")
    plan = metrics["plan"]
    assert plan["plan.attention"] == "varlen" and plan["plan.compile"] is True
    assert plan["plan.token_budget"] == 2 * 96 and plan["plan.compile_backend"] == "aot_eager"
    assert metrics["steps"] == 8
    # the packing varies (rows of different lengths and conversation counts); the shapes do not
    ranks = metrics["ranks"][0]
    assert ranks["batches"] >= 8 and 0 < ranks["tokens"] < ranks["batches"] * 2 * 96  # real tokens: no padding
    assert len(metrics["step_tokens"]) == 8 and len(set(metrics["step_tokens"])) > 2
    # everything compiles in the first step: two graphs, since the first layer's input needs no gradient and the
    # others' do; then none
    assert metrics["compile_frames"] >= 1 and metrics["compiles_after_first_step"] == 0, metrics
    assert all("requires_grad mismatch" in r for r in metrics["recompile_reasons"]), metrics["recompile_reasons"]
    assert metrics["compile_s"] > 0 and metrics["first_step_s"] > metrics["median_step_s"] > 0
    assert metrics["eval_loss"] < metrics["base_eval_loss"]  # it trained, through the compiled layers

    from mlflow import MlflowClient

    from recipes import load_recipe
    from workbench.tracking import tracking_uri

    run_id = json.loads((recipe.parent / "runs" / "once" / "train" / "manifest.json").read_text())["results"]
    run = MlflowClient(tracking_uri(load_recipe(recipe))).get_run(run_id["mlflow_run_id"])
    assert run.data.params["plan.token_budget"] == "192" and run.data.params["plan.compile"] == "True"
    assert run.data.metrics["compiles_after_first_step"] == 0 and run.data.metrics["compile_s"] > 0

    # the control: the same training with rows of their own length sees new shapes and compiles again
    varying, _ = _train_compiled(make_recipe, run_cli, tiny_model_dir, "varying", token_budget=False)
    assert varying["plan"]["plan.token_budget"] == 0
    assert varying["compiles_after_first_step"] >= 1, varying
    assert any("size mismatch" in r for r in varying["recompile_reasons"]), varying["recompile_reasons"]
    # and the padding changed nothing but the shapes: the same batches train to the same model
    assert varying["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert varying["ranks"][0]["tokens"] == ranks["tokens"]
