"""The families' chat templates, reduced to what they do for one user turn (an image and a text)
and one answer, keeping each template's structure and special tokens exactly: where the turn
markers go, what the generation prompt adds, what follows an answer. Each cites its source.
"""

# google/gemma-4-31b-it (and 12B/26B) chat_template.jinja: `<|turn>role\n ... <turn|>\n`, the
# assistant role is "model", an image is `<|image|>` (the processor expands it into
# `<|image>` + soft tokens + `<image|>`), a model turn's text goes through `strip_thinking`
# (everything between `<|channel>` and `<channel|>` is dropped from history), and the generation
# prompt, with thinking off (the default), ends in an empty closed thought channel.
_GEMMA4_BODY = (
    "{%- macro strip_thinking(text) -%}"
    "{%- set ns = namespace(result='') -%}"
    "{%- for part in text.split('<channel|>') -%}"
    "{%- if '<|channel>' in part -%}{%- set ns.result = ns.result + part.split('<|channel>')[0] -%}"
    "{%- else -%}{%- set ns.result = ns.result + part -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.result | trim -}}"
    "{%- endmacro -%}"
    "{%- set loop_messages = messages -%}"
    "{{- bos_token -}}"
    "{%- if (enable_thinking is defined and enable_thinking) or messages[0]['role'] == 'system' -%}"
    "{{- '<|turn>system\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] | trim -}}{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- if role == 'model' -%}{{- strip_thinking(message['content']) -}}"
    "{%- else -%}{{- message['content'] | trim -}}{%- endif -%}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{%- if role == 'model' -%}{{- strip_thinking(item['text']) -}}"
    "{%- else -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- elif item['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
)
GEMMA4_THINKING = (
    _GEMMA4_BODY + "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}"
    "{%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\\n<channel|>' -}}"
    "{%- endif -%}{%- endif -%}"
)
# google/gemma-4-e2b-it / e4b-it: the same template without the empty thought channel in the
# generation prompt (the E-series' only difference there).
GEMMA4_E = _GEMMA4_BODY + "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
GEMMA4_WORDS = "user model system thought"

# Qwen/Qwen2.5-VL-7B-Instruct chat_template.json: ChatML with a default system message, an image
# is `<|vision_start|><|image_pad|><|vision_end|>` (the processor repeats the pad per patch).
QWEN2_5_VL = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_WORDS = "system user assistant You are a helpful assistant ."

# Qwen/Qwen3-VL-8B-Instruct chat_template.json: ChatML without a default system message.
QWEN3_VL = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# HuggingFaceTB/SmolVLM-256M-Instruct (Idefics3) chat_template.json; SmolVLM2's has the same
# image-and-text structure.
SMOLVLM = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_WORDS = "User Assistant"

# llava-hf/llava-1.5-7b-hf chat_template.json: "USER: <image>\n... ASSISTANT:"; an answer is
# followed by a space and no end-of-turn marker (the model stops at its EOS, </s>).
LLAVA = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_WORDS = "USER ASSISTANT"

# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json: Mistral's [INST] format, no generation
# prompt, and an answer followed by the literal text `<\s>` (not the EOS token </s>): a real
# quirk of that template, kept because it is what the trainer meets.
LLAVA_NEXT = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\s> '}}"
    "{% endif %}{% endfor %}"
)
LLAVA_NEXT_WORDS = "[ INST / ] < \\ s >"
