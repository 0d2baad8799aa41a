"""radixrt's frontend language: structured LLM programs that get prefix reuse for free.

    from radixrt.lang import function, gen, select, user, assistant, EngineBackend

    @function
    def qa(s, question):
        s += user(question)
        s += assistant(gen("answer", max_tokens=64))

    state = qa.run(question="What is a radix tree?", backend=EngineBackend())
    print(state["answer"])
"""

from radixrt.lang.backends import Backend, BackendError, EngineBackend, GenParams
from radixrt.lang.chat_template import ChatTemplate
from radixrt.lang.http_backend import RuntimeEndpoint
from radixrt.lang.ops import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    gen_int,
    gen_string,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from radixrt.lang.program import Program, function
from radixrt.lang.state import ForkedStates, ProgramError, ProgramState

__all__ = [
    "Backend", "BackendError", "ChatTemplate", "EngineBackend", "ForkedStates", "GenParams",
    "Program", "ProgramError", "ProgramState", "RuntimeEndpoint", "assistant", "assistant_begin",
    "assistant_end", "function", "gen", "gen_int", "gen_string", "select", "system",
    "system_begin", "system_end", "user", "user_begin", "user_end",
]
