"""Client chat templates render in a child process: deadline, memory and output limits, and
a fresh child after one is killed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from radixrt.text.template_sandbox import TemplateBusy, TemplateError, TemplateSandbox

MSGS = [{"role": "user", "content": "hi"}]
SIMPLE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{{ bos_token }}"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[TemplateSandbox]:
    sb = TemplateSandbox(timeout_s=1.0, max_chars=1000)
    yield sb
    sb.close()


def test_renders_like_a_chat_template(sandbox: TemplateSandbox) -> None:
    assert sandbox.render(SIMPLE, MSGS, True, False, {"bos_token": "<s>"}) == "<user>hi<s>"


@pytest.mark.parametrize("template,needle", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "did not finish"),
    ("{{ 'x' * 10**10 }}", "memory"),
    ("{% for i in range(2000) %}{{ i }}{% endfor %}", "limit is 1000"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{% for %}", "TemplateSyntaxError"),
])
def test_hostile_templates_fail_cleanly_and_the_next_renders(sandbox: TemplateSandbox,
                                                             template: str,
                                                             needle: str) -> None:
    with pytest.raises(TemplateError, match=needle):
        sandbox.render(template, MSGS, False, False, {})
    assert sandbox.render(SIMPLE, MSGS, True, False, {"bos_token": ""}) == "<user>hi"


def test_busy_renderer_is_reported_not_waited_on(sandbox: TemplateSandbox) -> None:
    assert sandbox._lock.acquire()
    try:
        with pytest.raises(TemplateBusy):
            sandbox.render(SIMPLE, MSGS, True, False, {})
    finally:
        sandbox._lock.release()
