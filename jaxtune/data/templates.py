"""Chat templates: the built-in ones, and which template a dataset renders with.

`chat_template:` (top level or per dataset) is `tokenizer_default` (the template shipped with the
tokenizer), `tokenizer_default_fallback_<name>` (the tokenizer's, else a built-in), a built-in
name, `jinja` (with `chat_template_jinja:`), or a Jinja string itself. The built-ins are the
templates the model families ship with, written out so a base-model tokenizer (which has none)
can still train chat data. Templates render exactly as `tokenizer.apply_chat_template` does: the
same compiled Jinja environment, the same variables.
"""

from __future__ import annotations

from transformers.utils.chat_template_utils import _compile_jinja_template

from jaxtune.config.problems import did_you_mean
from jaxtune.errors import ConfigError

CHATML = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-7B-Instruct-v0.1: no system role.
MISTRAL_V1 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# Mistral-7B-Instruct-v0.2/v0.3 style: an optional system message joins the first user turn.
MISTRAL_V2V3 = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Qwen2.5-Instruct's template (ChatML with a default system prompt and tool turns).
QWEN_25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

BUILTIN_TEMPLATES = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "mistral_v1": MISTRAL_V1,
    "mistral_v2v3": MISTRAL_V2V3,
    "mistral": MISTRAL_V2V3,
    "qwen_25": QWEN_25,
    "qwen": QWEN_25,
}
# The token each built-in template closes a turn with, trained per `train_on_eos`.
BUILTIN_END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral_v1": "</s>",
                       "mistral_v2v3": "</s>", "mistral": "</s>", "qwen_25": "<|im_end|>",
                       "qwen": "<|im_end|>"}
TOKENIZER_DEFAULT = "tokenizer_default"
FALLBACK_PREFIX = "tokenizer_default_fallback_"


def looks_like_jinja(text: str) -> bool:
    return "{%" in text or "{{" in text


def select_template(name: str | None, jinja: str | None, tokenizer, key: str) -> str:
    """The Jinja source a dataset renders with; a ConfigError naming `key` when there is none.

    `name` and `jinja` are the dataset's `chat_template` / `chat_template_jinja` (falling back to
    the top level), `tokenizer` supplies `tokenizer_default`.
    """
    name = name or TOKENIZER_DEFAULT
    key = f"{key}." if key else ""
    if name == "jinja":
        if not jinja:
            raise ConfigError(f"{key}chat_template_jinja: required when chat_template is 'jinja'")
        return jinja
    if looks_like_jinja(name):
        return name
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if isinstance(tokenizer.chat_template, dict):
        own = tokenizer.chat_template.get("default")
    if name == TOKENIZER_DEFAULT:
        if not own:
            raise ConfigError(
                f"{key}chat_template: the tokenizer ({tokenizer.name_or_path}) has no chat template; "
                f"set chat_template to a built-in ({', '.join(sorted(BUILTIN_TEMPLATES))}) "
                "or to jinja with chat_template_jinja")
        return own
    if name.startswith(FALLBACK_PREFIX):
        fallback = name.removeprefix(FALLBACK_PREFIX)
        if fallback not in BUILTIN_TEMPLATES:
            raise ConfigError(f"{key}chat_template: unknown fallback template {fallback!r}"
                              f"{did_you_mean(fallback, BUILTIN_TEMPLATES)}")
        return own or BUILTIN_TEMPLATES[fallback]
    raise ConfigError(f"{key}chat_template: unknown template {name!r}"
                      f"{did_you_mean(name, [*BUILTIN_TEMPLATES, TOKENIZER_DEFAULT, 'jinja'])}; "
                      f"built-in: {', '.join(sorted(BUILTIN_TEMPLATES))}, or tokenizer_default, or jinja")


def compile_template(source: str, key: str):
    """The compiled Jinja template (cached by transformers); a ConfigError if it does not parse."""
    import jinja2

    key = f"{key}." if key else ""
    try:
        return _compile_jinja_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{key}chat_template: the Jinja template does not parse: {e.message} "
                          f"(template line {e.lineno})") from None
