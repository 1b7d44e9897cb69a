"""Recipe validation: every problem at once, with FILE:LINE and the field path; shipped recipes load."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipes import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[3]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))

BROKEN = textwrap.dedent("""\
    name: Bad Name
    base_model:
      hub_id: HuggingFaceTB/SmolLM2-135M-Instruct
      revision: main
    data:
      raw: data/raw/stdlib.jsonl
      golden: demo/golden/stdlib.jsonl
      colour: blue
    cleaning: {}
    train:
      r: -4
      learnng_rate: 0.1
      batch_size: "eight"
    quantize:
      merge: false
      targets:
        - kind: gguf
          types: [F16, Q9_K]
    eval_gate: {}
    """)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_loads_and_says_how_to_run_it(path):
    recipe = load_recipe(path)
    assert recipe.name
    lines = path.read_text().splitlines()
    opening = []
    for line in lines:
        if not line.startswith("#"):
            break
        opening.append(line)
    assert any(f"wb run recipes/{path.name}" in line for line in opening), "the opening comment must show how to run it"


def test_broken_recipe_lists_every_problem_with_line_and_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    got = {(p.line, p.path) for p in info.value.problems}
    expected = {
        (1, "name"),                       # not a slug
        (1, "registry"),                   # missing section
        (4, "base_model.revision"),        # branch name instead of a commit
        (8, "data.colour"),                # unknown key
        (11, "train.r"),                   # negative rank
        (12, "train.learnng_rate"),        # typo
        (13, "train.batch_size"),          # wrong type
        (15, "quantize.merge"),            # cross-section rule
        (18, "quantize.targets.0.types"),  # unknown GGUF type
    }
    assert expected <= got, sorted(got)
    text = str(info.value)
    assert f"{path}:12: train.learnng_rate: unknown key; did you mean 'learning_rate'?" in text
    assert "40-hex" in text


def test_bad_indent_is_a_yaml_error_with_its_line(tmp_path):
    path = tmp_path / "indent.yaml"
    path.write_text("name: x\ntrain:\n  r: 4\n   alpha: 3\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    [problem] = info.value.problems
    assert (problem.line, problem.path) == (4, "yaml")


def test_duplicate_keys_and_missing_file_are_reported(tmp_path):
    demo = (REPO / "recipes" / "demo.yaml").read_text()
    path = tmp_path / "dup.yaml"
    path.write_text(demo + "\nseed: 7\n")
    with pytest.raises(RecipeError, match="seed: duplicate key"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_base_model_needs_exactly_one_pinned_source(tmp_path, make_recipe):
    good = make_recipe()
    text = good.read_text()
    bad = tmp_path / "nopin.yaml"
    # a local path without sha256 is not pinned
    import yaml

    data = yaml.safe_load(text)
    data["base_model"] = {"path": "bases/x"}
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError, match="needs sha256"):
        load_recipe(bad)
    data["base_model"] = {"hub_id": "org/model", "revision": "a" * 40, "trust_remote_code": True}
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError, match="trust_remote_code"):
        load_recipe(bad)


def test_wb_validate_exit_codes_and_no_torch_import(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    bad = subprocess.run([sys.executable, "-m", "workbench", "validate", str(path)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert f"{path}:11: train.r:" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "workbench", "validate", "recipes/demo.yaml"], capture_output=True, text=True, cwd=REPO)
    assert good.returncode == 0, good.stderr
    # --help and validate must stay fast: they may not import torch (or transformers)
    probe = textwrap.dedent("""
        import sys
        from workbench.cli import main
        for argv in (["validate", "recipes/demo.yaml"], ["status", "recipes/demo.yaml"]):
            main(argv)
        for argv in (["--help"], ["promote", "--help"], ["pull", "--help"]):
            try:
                main(argv)
            except SystemExit as exc:  # --help exits 0 after printing
                assert exc.code == 0, (argv, exc.code)
        heavy = sorted(m for m in ("torch", "transformers", "mlflow", "llama_cpp", "datasets") if m in sys.modules)
        print("HEAVY=" + ",".join(heavy))
        """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout, out.stdout
    assert "usage: wb promote" in out.stdout and "--alias ALIAS" in out.stdout and "--format FORMAT" in out.stdout


def test_unsupported_architecture_fails_at_validation(tmp_path, make_recipe):
    # llama.cpp's converter has no OPT (the demo recipe has a gguf target)
    base = tmp_path / "opt"
    base.mkdir()
    (base / "config.json").write_text('{"architectures": ["OPTForCausalLM"], "model_type": "opt"}')
    (base / "model.safetensors").write_bytes(b"weights")
    path = make_recipe(base_dir=base)
    with pytest.raises(RecipeError, match=r"base_model: base model architecture 'OPTForCausalLM' is not supported"):
        load_recipe(path)


def test_demo_vs_api_reuses_every_demo_stage_but_the_gate_and_publish():
    from workbench.workspace import STAGES

    demo, vs_api = load_recipe(REPO / "recipes" / "demo.yaml"), load_recipe(REPO / "recipes" / "demo-vs-api.yaml")
    assert (demo.name, demo.workspace) == (vs_api.name, vs_api.workspace)
    differ = {s for s, spec in STAGES.items() if demo.section_hash(*spec.sections) != vs_api.section_hash(*spec.sections)}
    assert differ == {s for s, spec in STAGES.items() if "eval_gate" in spec.sections}
    assert [e.base_url for e in vs_api.eval_gate.endpoints] == ["http://127.0.0.1:8091/v1"]
