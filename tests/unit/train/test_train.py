"""The train stage on a tiny 2-layer Llama (real SmolLM2 tokenizer): output contract, template, tracking, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._train_helpers import make_clean

TINY_TRAIN = {"max_steps": 4, "batch_size": 4, "save_steps": 2, "logging_steps": 1, "max_seq_len": 128,
              "learning_rate": 0.003, "warmup_ratio": 0.0, "heldout_max_records": 4}


def _ws(recipe_path: Path) -> Path:
    import yaml

    data = yaml.safe_load(recipe_path.read_text())
    return Path(data["workspace"]) / data["name"]


def test_train_writes_the_stage_contract(tiny_model_dir, make_recipe, run_cli):
    recipe = make_recipe(base_dir=tiny_model_dir, train=TINY_TRAIN)
    make_clean(recipe)
    proc = run_cli("-m", "train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = _ws(recipe) / "train"
    adapter = out / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (adapter / name).is_file(), name
    assert (out / "metrics.json").is_file() and (out / "loss.png").is_file()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert cfg["r"] == 16 and cfg["use_dora"] is False
    manifest = json.loads((out / "manifest.json").read_text())
    res = manifest["results"]
    assert res["method"] == "lora" and res["steps"] == 4
    assert res["eval_perplexity"] > 1 and res["base_eval_perplexity"] > 1
    assert res["mlflow_run_id"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [p["step"] for p in metrics["loss_curve"]][:2] == [1, 2]
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_mib"] > 0
    assert metrics["ranks"][0]["trained_tokens"] > 0
    # with a high learning rate the tiny model must improve on its own eval split
    assert res["eval_perplexity"] < res["base_eval_perplexity"]
    _check_mlflow_run(recipe, res["mlflow_run_id"], metrics)
    # the completed run leaves no checkpoints behind; a second run is a no-op
    assert not any((_ws(recipe) / ".scratch" / "train").glob("*/checkpoints"))
    again = run_cli("-m", "train", str(recipe))
    assert again.returncode == 0 and "up to date" in again.stdout
    assert not list(adapter.glob("*.bin"))  # no pickles
    _check_adapter_answers(tiny_model_dir, adapter)


def _check_adapter_answers(base_dir: Path, adapter: Path) -> None:
    """The adapter loads with peft on the base and answers through the template it was trained with."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from workbench.chat import CHATML_PATH

    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.chat_template == CHATML_PATH.read_text()
    gen = GenerationConfig.from_pretrained(adapter)
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # trained, not init
    prompt = tok.apply_chat_template([{"role": "user", "content": "What does os.path.join do?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**prompt, generation_config=gen, max_new_tokens=4)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def _check_mlflow_run(recipe_path: Path, run_id: str, metrics: dict) -> None:
    from mlflow import MlflowClient

    from recipes import load_recipe
    from workbench.tracking import tracking_uri

    client = MlflowClient(tracking_uri(load_recipe(recipe_path)))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.method"] == "lora" and run.data.params["plan.device"] == "cpu"
    assert [m.step for m in client.get_metric_history(run_id, "loss")][:2] == [1, 2]
    for name in ("learning_rate", "tokens_per_s", "peak_memory_mib", "eval_perplexity", "base_eval_perplexity"):
        assert name in run.data.metrics, name
    assert run.data.metrics["eval_perplexity"] == pytest.approx(metrics["eval_perplexity"])
    clean = json.loads((_ws(recipe_path) / "clean" / "manifest.json").read_text())
    digests = {i.dataset.name.rsplit("/", 1)[1]: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert digests["train"] == clean["results"]["fingerprints"]["train"][:36]
    assert run.data.params["data.eval.fingerprint"] == clean["results"]["fingerprints"]["eval"]


def test_chatml_template_renders_like_smollm2_and_masks_the_answers(tiny_model_dir):
    from transformers import AutoTokenizer

    from workbench.chat import CHATML_PATH, resolve_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # carries SmolLM2's own template
    ours = resolve_chat_template("chatml", tok, assistant_only_loss=True)
    assert ours == CHATML_PATH.read_text()
    cases = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"},
         {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}],
        [{"role": "user", "content": "only a question"}],
    ]
    for messages in cases:
        for gen in (False, True):
            want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=ours)
            assert got == want
    out = tok.apply_chat_template(cases[1], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  chat_template=ours)
    learned = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert learned == "c<|im_end|>e<|im_end|>"


def test_template_without_generation_markers_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from workbench.chat import resolve_chat_template
    from workbench.workspace import StageError

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(StageError, match="no {% generation %} markers"):
        resolve_chat_template("base", tok, assistant_only_loss=True)
    assert resolve_chat_template("base", tok, assistant_only_loss=False) == tok.chat_template
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(StageError, match=str(custom)):
        resolve_chat_template(str(custom), tok, assistant_only_loss=True)
    with pytest.raises(StageError, match="does not exist"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), tok, assistant_only_loss=False)


def test_qlora_without_cuda_fails_before_any_work(tiny_model_dir, make_recipe, capsys):
    import torch

    from train.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    recipe = make_recipe(base_dir=tiny_model_dir, train={**TINY_TRAIN, "method": "qlora"})
    make_clean(recipe)
    assert main([str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "qlora" in err and "CUDA" in err
    ws = _ws(recipe)
    assert not (ws / "train").exists() and not list(ws.glob(".tmp-train-*"))
    assert not (ws.parent / "mlflow").exists()  # nothing was tracked either


def test_missing_clean_stage_and_bad_records_are_named(tiny_model_dir, make_recipe, capsys):
    from train.__main__ import main

    recipe = make_recipe(base_dir=tiny_model_dir, train=TINY_TRAIN)
    assert main([str(recipe)]) == 1
    assert "stage 'clean' has not run yet" in capsys.readouterr().err
    bad = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
           {"messages": [{"role": "user", "content": "only a question"}]}]
    make_clean(recipe, train_records=bad)
    assert main([str(recipe)]) == 1
    assert "clean/train: record 1: no assistant turn" in capsys.readouterr().err
    bad[1] = {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]}
    make_clean(recipe, train_records=bad)
    assert main([str(recipe)]) == 1
    assert "clean/train: record 1, message 0: needs role" in capsys.readouterr().err
    assert not (_ws(recipe) / "train").exists()


def test_unknown_train_key_is_a_recipe_error(tiny_model_dir, make_recipe, capsys):
    from train.__main__ import main

    recipe = make_recipe(base_dir=tiny_model_dir, train={**TINY_TRAIN, "lora_rank": 8})
    assert main([str(recipe)]) == 2
    assert "lora_rank" in capsys.readouterr().err
