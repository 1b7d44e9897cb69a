"""The chat template in the Ollama Modelfile: a Go template that must render exactly what the HF tokenizer's
Jinja template renders (the GGUF carries the Jinja template itself; workbench.chat knows the formats).

There is no general Jinja -> Go translation. We know the Go templates of the families we support (ChatML,
Llama 3, Mistral, Gemma 3, Phi-3; `stop[0]` of each is the token that ends an assistant turn), pick the one
that renders the same text as the HF template for a set of probe conversations,
and refuse the template otherwise. The Go templates are rendered here by a small renderer of the
constructs we emit, so the parity check runs without Ollama.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources

from workbench.chat import CHATML_END, CHATML_START

def golden_conversation() -> list[dict[str, str]]:
    """The fixed conversation every parity check renders (system, two user turns, one assistant turn)."""
    return json.loads(resources.files("quantize").joinpath("golden_conversation.json").read_text(encoding="utf-8"))


# Conversations the Go template must reproduce: with and without a system turn, single and multi-turn.
PROBES: list[list[dict[str, str]]] = [
    [{"role": "system", "content": "SYS"}, {"role": "user", "content": "U1"}],
    [{"role": "user", "content": "U1"}],
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
    [{"role": "system", "content": "SYS"}, {"role": "user", "content": "U1"},
     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
]


@dataclass(frozen=True)
class TemplateFamily:
    name: str
    go_template: str
    stop: tuple[str, ...]
    # how the family writes a system turn: finds a default system prompt the HF template inserts by itself
    system_turn: str


FAMILIES = (
    TemplateFamily(
        name="chatml",
        go_template=(
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
            "{{ .Content }}<|im_end|>\n"
            "{{ end }}<|im_start|>assistant\n"
        ),
        stop=(CHATML_END, CHATML_START),
        system_turn=r"<\|im_start\|>system\n(?P<system>.*?)<\|im_end\|>\n",
    ),
    TemplateFamily(
        name="llama3",
        go_template=(
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
            "{{ .Content }}<|eot_id|>"
            "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        stop=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
        system_turn=r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(?P<system>.*?)<\|eot_id\|>",
    ),
    # Mistral Instruct (v0.3, Nemo): no system turn; the system prompt opens the last user message
    TemplateFamily(
        name="mistral",
        go_template=(
            "{{- range $i, $_ := .Messages }}"
            "{{- if eq .Role \"user\" }}[INST]{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n"
            "{{ end }}{{ .Content }}[/INST]"
            "{{- else if eq .Role \"assistant\" }}{{ .Content }}</s>"
            "{{- end }}{{- end }}"
        ),
        stop=("</s>", "[INST]", "[/INST]"),
        system_turn=r"\[INST\](?P<system>.*?)\n\n",
    ),
    # Gemma 3: the assistant is "model"; the system prompt opens the first user turn
    TemplateFamily(
        name="gemma",
        go_template=(
            "{{- range $i, $_ := .Messages }}"
            "{{ if eq .Role \"user\" }}<start_of_turn>user\n{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}"
            "{{ .Content }}<end_of_turn>\n"
            "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n"
            "{{ end }}{{ end }}<start_of_turn>model\n"
        ),
        stop=("<end_of_turn>", "<start_of_turn>"),
        system_turn=r"<start_of_turn>user\n(?P<system>.*?)\n\n",
    ),
    # Phi-3 / Phi-3.5
    TemplateFamily(
        name="phi3",
        go_template="{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        stop=("<|end|>", "<|user|>", "<|assistant|>", "<|system|>"),
        system_turn=r"<\|system\|>\n(?P<system>.*?)<\|end\|>\n",
    ),
)


@dataclass(frozen=True)
class OllamaTemplate:
    family: str
    template: str
    system: str | None  # the default system prompt (Modelfile SYSTEM) the HF template inserts when none is given
    stop: tuple[str, ...]
    bos_text: str  # what the HF template writes before the first turn (a BOS token: llama.cpp adds it instead)


class TemplateMismatch(ValueError):
    """The chat template cannot be reproduced outside transformers."""


def render_hf(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def ollama_template_for(tokenizer) -> OllamaTemplate:
    """The Go template (with SYSTEM default and stop tokens) that renders what the tokenizer's chat template renders."""
    if not tokenizer.chat_template:
        raise TemplateMismatch("the adapter's tokenizer has no chat template")
    tried = []
    probe = render_hf(tokenizer, PROBES[1])
    bos = tokenizer.bos_token or ""
    # a BOS the template writes itself is added by llama.cpp's tokenizer instead (add_bos); some BOS tokens
    # (SmolLM2's is <|im_start|>) are also template markers, so try both readings
    bos_readings = [""] + ([bos] if bos and probe.startswith(bos) else [])
    for fam in FAMILIES:
        for bos_text in bos_readings:
            m = re.match(fam.system_turn, probe[len(bos_text):], flags=re.S)
            default_system = m.group("system") if m and "U1" not in m.group("system") else None
            candidate = OllamaTemplate(fam.name, fam.go_template, default_system, fam.stop, bos_text)
            diff = first_difference_vs_hf(tokenizer, candidate)
            if diff is None:
                return candidate
        tried.append(f"{fam.name}: {diff}")
    raise TemplateMismatch(
        "the chat template matches no Ollama template family this stage can write ("
        + "; ".join(tried) + f"); use a template of one of these families ({', '.join(f.name for f in FAMILIES)}) "
        "or train.chat_template: chatml"
    )


def first_difference_vs_hf(tokenizer, tmpl: OllamaTemplate) -> str | None:
    for probe in PROBES:
        hf = render_hf(tokenizer, probe)
        go = tmpl.bos_text + render_ollama(tmpl.template, probe, tmpl.system)
        if hf != go:
            i = next((k for k, (a, b) in enumerate(zip(hf, go)) if a != b), min(len(hf), len(go)))
            return f"differs at char {i} for roles {[m['role'] for m in probe]}: HF {hf[i:i + 40]!r} vs Go {go[i:i + 40]!r}"
    return None


# ---- Modelfile ---------------------------------------------------------------------------------------

def modelfile_text(gguf_name: str, tmpl: OllamaTemplate, parameters: dict[str, object]) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{tmpl.template}"""']
    if tmpl.system is not None:
        lines.append(f'SYSTEM """{tmpl.system}"""')
    for stop in tmpl.stop:
        lines.append(f'PARAMETER stop "{stop}"')
    for key, value in parameters.items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict:
    """FROM / ADAPTER / TEMPLATE / SYSTEM / PARAMETER of a Modelfile (triple-quoted values may span lines)."""
    out: dict = {"parameters": {}, "stop": []}
    pos = 0
    pattern = re.compile(r'^(FROM|ADAPTER|TEMPLATE|SYSTEM|PARAMETER)\s+(?:"""(.*?)"""|(.*?))\s*$', re.S | re.M)
    for m in pattern.finditer(text):
        if text[pos:m.start()].strip():
            raise ValueError(f"Modelfile: cannot parse {text[pos:m.start()].strip()[:60]!r}")
        pos = m.end()
        key, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        if key == "PARAMETER":
            name, _, val = value.partition(" ")
            val = val.strip()
            if name == "stop":
                out["stop"].append(json.loads(val) if val.startswith('"') else val)
            else:
                out["parameters"][name] = val
        else:
            out[key.lower()] = value
    return out


def render_modelfile_prompt(modelfile: str, messages: list[dict]) -> str:
    """The prompt text Ollama builds from a Modelfile for a chat request."""
    mf = parse_modelfile(modelfile)
    return render_ollama(mf["template"], messages, mf.get("system"))


def render_ollama(template: str, messages: list[dict], default_system: str | None) -> str:
    # Ollama prepends the Modelfile SYSTEM as a system message when the request has none.
    if default_system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": default_system}] + list(messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render_go_template(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
                                         "System": system})


# ---- a Go text/template renderer for the constructs we emit -------------------------------------------
# {{ .Field }}, {{ $.Field }}, {{ $var }}, {{ range .List }} / {{ range $i, $m := .List }}...{{ end }},
# {{ if X }}...{{ else if Y }}...{{ else }}...{{ end }}, the functions eq, ne, and, or, not, len, slice with
# (parenthesised) arguments, and the {{- / -}} whitespace trimming markers.

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_RANGE_VARS = re.compile(r"^(\$\w+)(?:\s*,\s*(\$\w+))?\s*:=\s*(.+)$", re.S)


def render_go_template(template: str, data: dict) -> str:
    tokens: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "trim_next":
            tokens.pop()
            text = text.lstrip()
        tokens.append(("text", text))
        tokens.append(("action", m.group(2).strip()))
        if m.group(3):
            tokens.append(("trim_next", ""))
        pos = m.end()
    tail = template[pos:]
    if tokens and tokens[-1][0] == "trim_next":
        tokens.pop()
        tail = tail.lstrip()
    tokens.append(("text", tail))
    tree, rest = _parse(tokens, 0, top=True)
    out: list[str] = []
    _exec(tree, data, data, out, {})
    return "".join(out)


def _parse(tokens, i, top=False):
    nodes = []
    while i < len(tokens):
        kind, val = tokens[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        word = val.split(None, 1)[0] if val else ""
        if word in ("end", "else"):
            if top:
                raise ValueError(f"Go template: unexpected {{{{ {val} }}}}")
            return nodes, i
        if word in ("range", "if"):
            node, i = _parse_block(tokens, i + 1, word, val.split(None, 1)[1])
            nodes.append(node)
            continue
        nodes.append(("expr", val))
        i += 1
    if not top:
        raise ValueError("Go template: missing {{ end }}")
    return nodes, i


def _parse_block(tokens, i, word, head):
    """The body of a range/if starting at token i, its else branch (an `else if` is an if inside the else,
    sharing its end), and the index after the closing end."""
    body, i = _parse(tokens, i)
    other = []
    closing = tokens[i][1]
    if closing.startswith("else if "):
        nested, i = _parse_block(tokens, i + 1, "if", closing[len("else if "):])
        return (word, head, body, [nested]), i
    if closing == "else":
        other, i = _parse(tokens, i + 1)
    if tokens[i][1] != "end":
        raise ValueError(f"Go template: {{{{ {word} {head} }}}} is not closed by {{{{ end }}}}")
    return (word, head, body, other), i + 1


def _split_args(expr: str) -> list[str]:
    """Top-level arguments of an expression: quoted strings, parenthesised groups, and words."""
    args, depth, start, quoted = [], 0, None, False
    for k, ch in enumerate(expr + " "):
        if quoted:
            quoted = not (ch == '"' and expr[k - 1] != "\\")
            continue
        if ch == '"':
            quoted = True
            start = k if start is None else start
        elif ch == "(":
            depth += 1
            start = k if start is None else start
        elif ch == ")":
            depth -= 1
        elif ch.isspace() and depth == 0:
            if start is not None:
                args.append(expr[start:k])
                start = None
        elif start is None:
            start = k
    return args


_FUNCS = {
    "eq": lambda a, *rest: any(a == b for b in rest),
    "ne": lambda a, b: a != b,
    "not": lambda a: not a,
    "len": lambda a: len(a or []),
    "slice": lambda a, *ix: a[ix[0]:ix[1]] if len(ix) > 1 else a[ix[0] if ix else 0:],  # Go: slice x i j = x[i:j]
}


def _value(expr: str, dot, root, scope: dict):
    expr = expr.strip()
    args = _split_args(expr)
    if len(args) > 1:
        name, rest = args[0], args[1:]
        if name == "and":  # Go's and/or return the deciding argument, evaluating left to right
            v = None
            for a in rest:
                v = _value(a, dot, root, scope)
                if not v:
                    return v
            return v
        if name == "or":
            v = None
            for a in rest:
                v = _value(a, dot, root, scope)
                if v:
                    return v
            return v
        if name not in _FUNCS:
            raise ValueError(f"Go template: unsupported function {name!r} in {expr!r}")
        return _FUNCS[name](*(_value(a, dot, root, scope) for a in rest))
    if expr.startswith("(") and expr.endswith(")"):
        return _value(expr[1:-1], dot, root, scope)
    if expr.startswith('"'):
        return json.loads(expr)
    if re.fullmatch(r"-?\d+", expr):
        return int(expr)
    if expr == ".":
        return dot
    if expr == "$":
        return root
    if re.match(r"^\$\w+", expr):
        name, _, path = expr.partition(".")
        if name not in scope:
            raise ValueError(f"Go template: undefined variable {name}")
        obj, path = scope[name], path or None
    else:
        obj, path = (root, expr[2:]) if expr.startswith("$.") else (dot, expr[1:]) if expr.startswith(".") else (None, None)
        if path is None:
            raise ValueError(f"Go template: unsupported expression {expr!r}")
    for part in (path.split(".") if path else []):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _exec(nodes, dot, root, out, scope):
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "expr":
            v = _value(node[1], dot, root, scope)
            out.append("" if v is None else str(v))
        elif kind == "if":
            _exec(node[2] if _value(node[1], dot, root, scope) else node[3], dot, root, out, scope)
        elif kind == "range":
            names = _RANGE_VARS.match(node[1])
            items = _value(names.group(3) if names else node[1], dot, root, scope) or []
            if not items:
                _exec(node[3], dot, root, out, scope)
            for k, item in enumerate(items):
                inner = dict(scope)
                if names and names.group(2):
                    inner[names.group(1)], inner[names.group(2)] = k, item
                elif names:
                    inner[names.group(1)] = item
                _exec(node[2], item, root, out, inner)
