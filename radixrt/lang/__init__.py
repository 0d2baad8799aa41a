"""radixrt's frontend language: structured LLM programs that get prefix reuse for free.
SGLang frontend programs run with ``import radixrt.lang as sgl``.

    import radixrt.lang as sgl

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.EngineBackend())   # or sgl.RuntimeEndpoint("http://...")
    state = qa.run(question="What is a radix tree?")
    print(state["answer"])
"""

from radixrt.lang.backends import Backend, BackendError, EngineBackend, GenParams
from radixrt.lang.chat_template import ChatTemplate
from radixrt.lang.choices import (
    ChoicesMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixrt.lang.exprs import (
    assistant,
    assistant_begin,
    assistant_end,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from radixrt.lang.extras import Engine, Runtime, image, separate_reasoning, video
from radixrt.lang.http_backend import RuntimeEndpoint
from radixrt.lang.ops import gen, gen_int, gen_string, select
from radixrt.lang.program import (
    Program,
    flush_cache,
    function,
    get_server_info,
    global_config,
    set_default_backend,
)
from radixrt.lang.state import ForkedStates, ProgramError, ProgramState

__all__ = [
    "Backend", "BackendError", "ChatTemplate", "ChoicesMethod", "Engine", "EngineBackend",
    "ForkedStates", "Runtime",
    "GenParams", "Program", "ProgramError", "ProgramState", "RuntimeEndpoint", "assistant",
    "assistant_begin", "assistant_end", "flush_cache", "function", "gen", "gen_int",
    "gen_string", "get_server_info", "global_config", "greedy_token_selection", "image",
    "select", "separate_reasoning", "set_default_backend", "system", "system_begin",
    "system_end", "token_length_normalized", "unconditional_likelihood_normalized", "user",
    "user_begin", "user_end", "video",
]
