"""Chat templates render exactly as transformers' `apply_chat_template(..., tokenize=False)`.

The templates are SmolLM2's (from its GGUF) and real-world ones written out below: Qwen3's (tools,
tool calls and responses, reasoning, `enable_thinking`), Llama 3.1's (tools as indented JSON,
`strftime_now`), Gemma's (which refuses a system message with `raise_exception`) and one with
the `{% generation %}` tag of training templates.
"""

# ruff: noqa: E501 -- the templates are quoted verbatim, long lines and all

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from ladle.engine.loading.chat_template import render_chat_template, validate_messages
from ladle.engine.loading.gguf import read_gguf
from ladle.errors import InvalidRequestError

QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

LLAMA3 = r"""{{- bos_token }}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

TRAINING = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city, in °C",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
}
CHATS = {
    "user": [{"role": "user", "content": "Hi there! 你好"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
    "tools": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 °C."},
        {"role": "user", "content": "Thanks"},
    ],
    "reasoning": [
        {"role": "user", "content": "Think, then answer: 3*3?"},
        {"role": "assistant", "content": "9", "reasoning": "3 times 3 is 9."},
        {"role": "user", "content": "And 4*4?"},
    ],
    "reasoning_last": [
        {"role": "user", "content": "4*4?"},
        {"role": "assistant", "content": "16", "reasoning": "Four fours."},
    ],
}
ALTERNATING = ["user", "multi_turn", "reasoning", "reasoning_last"]


@pytest.fixture(scope="module")
def reference():
    """A transformers tokenizer with just BOS and EOS: all `apply_chat_template` needs."""
    backend = Backend(WordLevel({"<s>": 0, "</s>": 1}, unk_token="<s>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _both(reference, template, chat, *, tools=None, add_generation_prompt=True, **kwargs):
    messages = validate_messages(chat)
    expected = reference.apply_chat_template(
        messages,
        tools=tools,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **{k: v for k, v in kwargs.items() if v is not None},
    )
    rendered = render_chat_template(
        template,
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        bos_token="<s>",
        eos_token="</s>",
        **kwargs,
    )
    return rendered, expected


@pytest.fixture(scope="module")
def smollm2_template(smollm2_path):
    return read_gguf(smollm2_path).metadata["tokenizer.chat_template"]


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["user", "system", "multi_turn"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(
    reference, smollm2_template, name, add_generation_prompt
):
    rendered, expected = _both(
        reference, smollm2_template, CHATS[name], add_generation_prompt=add_generation_prompt
    )
    assert rendered == expected


@pytest.mark.parametrize("name", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_qwen3_template_matches_transformers(
    reference, name, add_generation_prompt, enable_thinking
):
    for tools in (None, TOOLS):
        rendered, expected = _both(
            reference,
            QWEN3,
            CHATS[name],
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )
        assert rendered == expected


@pytest.mark.parametrize("name", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama3_template_matches_transformers(reference, name, add_generation_prompt):
    for tools in (None, TOOLS):
        rendered, expected = _both(
            reference, LLAMA3, CHATS[name], tools=tools, add_generation_prompt=add_generation_prompt
        )
        assert rendered == expected


@pytest.mark.parametrize("template", [GEMMA, TRAINING])
@pytest.mark.parametrize("name", ALTERNATING)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_and_training_templates_match_transformers(
    reference, template, name, add_generation_prompt
):
    rendered, expected = _both(
        reference, template, CHATS[name], add_generation_prompt=add_generation_prompt
    )
    assert rendered == expected


def test_qwen3_rendering_shows_tools_calls_and_thinking_switch(reference):
    rendered, _ = _both(reference, QWEN3, CHATS["tools"], tools=TOOLS, enable_thinking=False)
    assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in rendered
    assert '"description": "Current weather in a city, in °C"' in rendered  # tojson keeps non-ASCII
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    rendered, _ = _both(reference, QWEN3, CHATS["reasoning_last"], add_generation_prompt=False)
    assert (
        "<think>\nFour fours.\n</think>\n\n16" in rendered
    )  # `reasoning` read as reasoning_content


def test_template_raise_exception_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="System role not supported") as error:
        render_chat_template(GEMMA, CHATS["system"])
    assert error.value.param == "messages"


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{% for m in messages %}{{ m.content }}", "does not compile"),
        ("{{ messages[0].missing.field }}", "no attribute 'missing'"),
        ("{{ messages[0].content + 1 }}", "chat template failed"),
    ],
)
def test_broken_templates_are_invalid_requests(template, match):
    with pytest.raises(InvalidRequestError, match=match):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_unknown_role_names_the_field():
    chat = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    with pytest.raises(InvalidRequestError, match="robot") as error:
        validate_messages(chat)
    assert error.value.param == "messages[1].role"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hello", "messages"),
        (["hello"], "messages[0]"),
        ([{"content": "no role"}], "messages[0].role"),
        ([{"role": "user", "content": 42}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0]",
        ),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}],
            "messages[0].tool_calls[0]",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_malformed_messages_name_the_field(messages, param):
    with pytest.raises(InvalidRequestError) as error:
        validate_messages(messages)
    assert error.value.param == param


def test_validation_normalizes_what_templates_read():
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    chat = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": parts},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
    ]
    system, user, assistant = validate_messages(chat)
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"] == "line one\nline two"
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Zürich"}
    assert chat[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Zürich"}'  # not mutated
