"""Built-in chat templates and the jinja2 environment that renders every chat template.

Checkpoints ship their template as jinja2 source in tokenizer_config.json; the built-ins below
cover checkpoints that ship none (base models). Every template is written so that rendering a
conversation with ``add_generation_prompt=True`` gives a prefix of the same conversation with
the assistant's reply appended: minift.data.sft relies on that to find the reply's characters.

The built-ins are joined from one-line pieces, so they hold no stray newlines and render the
same with or without ``trim_blocks``; the newlines they print are real characters in the source.
"""
import json
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Llama 3 / 3.1 / 3.2 instruct format: header tokens around the role, <|eot_id|> ends a turn.
LLAMA3 = "".join([
    "{{ bos_token }}",
    "{% for message in messages %}",
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n",
    "{{ message['content'] | trim }}<|eot_id|>",
    "{% endfor %}",
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
])

# ChatML as Qwen2 / 2.5 use it: <|im_start|>role\n ... <|im_end|>\n, no BOS token.
CHATML = "".join([
    "{% for message in messages %}",
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n",
    "{% endfor %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
])

# Llama 2 chat: [INST] blocks, the system prompt folded into the first user turn, each reply
# closed by EOS and each exchange opened by BOS.
LLAMA2 = "".join([
    "{% if eos_token is not defined %}",
    "{{ raise_exception('the llama-2 chat template needs an eos_token') }}",
    "{% endif %}",
    "{% if messages and messages[0]['role'] == 'system' %}",
    "{% set system = messages[0]['content'] | trim %}{% set turns = messages[1:] %}",
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}",
    "{% for message in turns %}",
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
    "{{ raise_exception('llama-2 chat template: roles must alternate user/assistant "
    "after an optional system message') }}",
    "{% endif %}",
    "{% if message['role'] == 'user' %}",
    "{{ bos_token }}[INST] ",
    "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}",
    "{{ message['content'] | trim }} [/INST]",
    "{% else %} {{ message['content'] | trim }} {{ eos_token }}{% endif %}",
    "{% endfor %}",
])

# Alpaca: a preamble (or the system message), then ### Instruction / ### Response sections.
# Replies end with EOS so the model learns to stop; the blank line between exchanges belongs to
# the next instruction, so nothing trails the EOS inside a reply.
ALPACA = "".join([
    "{% if eos_token is not defined %}",
    "{{ raise_exception('the alpaca chat template needs an eos_token') }}",
    "{% endif %}",
    "{{ bos_token }}",
    "{% if messages and messages[0]['role'] == 'system' %}",
    "{{ messages[0]['content'] | trim }}\n\n{% set turns = messages[1:] %}",
    "{% else %}",
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n",
    "{% set turns = messages %}",
    "{% endif %}",
    "{% for message in turns %}",
    "{% if message['role'] == 'user' %}",
    "{% if not loop.first %}\n\n{% endif %}### Instruction:\n{{ message['content'] | trim }}\n\n",
    "{% elif message['role'] == 'assistant' %}",
    "### Response:\n{{ message['content'] | trim }}{{ eos_token }}",
    "{% else %}{{ raise_exception('alpaca chat template: unsupported role ' ~ message['role']) }}",
    "{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}### Response:\n{% endif %}",
])

BUILTIN_TEMPLATES = {"llama-3": LLAMA3, "chatml": CHATML, "llama-2": LLAMA2, "alpaca": ALPACA}


def default_template_name(vocab):
    """Picks a built-in template for a tokenizer whose checkpoint ships none.

    The special tokens a vocabulary already has tell which format the model family was built
    for; a base model with none of them gets alpaca, whose markers are plain text and whose
    replies end with the EOS token every tokenizer has.
    """
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama-3"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml"
    if "[INST]" in vocab:
        return "llama-2"
    return "alpaca"


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; templates expect plain json.dumps output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def compile_template(source):
    """Compiles chat template source in a sandbox with the names templates in the wild use.

    Templates come from downloaded checkpoints, so they run in jinja2's immutable sandbox.
    Raises ValueError when the source is not valid jinja2.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ValueError(f"chat template has a syntax error at line {err.lineno}: {err.message}") from err


def render(compiled, messages, add_generation_prompt, special_tokens):
    """Renders messages; errors raised by the template become ValueError with its message."""
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **special_tokens)
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"chat template error: {err}") from err
    except Exception as err:  # noqa: BLE001  the template is code from the checkpoint: anything
        # it raises (the sandbox's OverflowError for range(10**9), a ZeroDivisionError, ...) is
        # an error of the template, reported in one line rather than as a traceback
        detail = " ".join(str(err).split())[:200]
        raise ValueError(f"chat template error: {type(err).__name__}: {detail}") from err
