"""A dropped function, class or module is freed, with everything it closes over.

Decorating must not extend a function's life: nested functions made per call,
classes made by factories and modules reloaded by a notebook are decorated again
and again, and each generation must go when its last reference goes, capture on
or off. Checked with weakrefs and tracemalloc, never with timings.
"""
import gc
import importlib
import weakref

import pytest

from .isolation import defined, traced_growth


class Payload:
    """A stand-in for an activation tensor a nested helper closes over."""


def _dead(refs):
    gc.collect()
    return [ref for ref in refs if ref() is not None]


@pytest.mark.parametrize("active", [False, True], ids=["off", "on"])
@pytest.mark.parametrize("with_select", [False, True], ids=["plain", "select"])
def test_a_nested_decorated_function_and_what_it_closes_over_are_freed(gl, active, with_select):
    if active:
        gl.activate()
    refs, codes = [], []
    namespace = defined(
        """
        def forward(x):
            payload = Payload()
            select = (lambda value: value * 1) if with_select else None

            @gl("y", select=select)
            def helper(v):
                y = v + (payload is not None)
                return y

            refs.extend([weakref.ref(helper), weakref.ref(payload)])
            codes.append(weakref.ref(helper.__code__))
            return helper(x)
        """,
        Payload=Payload, gl=gl, with_select=with_select, refs=refs, codes=codes, weakref=weakref,
    )
    for call in range(20):
        assert namespace["forward"](call) == call + 1
    assert _dead(refs) == [], f"alive after gc, capture {'on' if active else 'off'}: {_dead(refs)}"
    if active:
        assert gl.cache["forward.<locals>.helper"] == list(range(1, 21))
    # The code a helper runs (instrumented or not) is shared by its generations
    # while their outer function lives, and goes with it.
    del namespace
    assert _dead(codes) == []


@pytest.mark.parametrize("active", [False, True], ids=["off", "on"])
def test_a_class_made_by_a_factory_is_freed(gl, active):
    if active:
        gl.activate()
    refs = []

    def make_class():
        payload = Payload()

        class Attention:
            @gl("attn")
            def forward(self, x):
                attn = x * 2 if payload else x
                return attn

        refs.extend([weakref.ref(Attention), weakref.ref(payload)])
        return Attention

    for call in range(10):
        assert make_class()().forward(call) == 2 * call
    assert _dead(refs) == []


@pytest.mark.parametrize("active", [False, True], ids=["off", "on"])
def test_a_reloaded_module_frees_its_previous_generation(gl, module_dir, active):
    module_dir(
        "reloaded_model",
        """
        BIG = [0] * 10000

        def attention(x):
            attn = x + len(BIG)
            return attn
        """,
    )
    module = importlib.import_module("reloaded_model")
    if active:
        gl.activate()
    refs = []
    for _ in range(20):
        gl("attn")(module.attention)
        refs.extend([weakref.ref(module.attention), weakref.ref(module.attention.__code__)])
        assert module.attention(1) == 10001
        module = importlib.reload(module)
    alive = _dead(refs[:-2])  # the newest generation is the module's current one
    assert alive == [], f"{len(alive)} objects of earlier generations alive after 20 reloads"


def _cycles(gl, cycles, selects):
    def one():
        big = Payload()

        @gl("y", select=(lambda v: v) if selects else None)
        def helper(v):
            y = v + (big is not None)
            return y

        return helper(1)

    for _ in range(cycles):
        one()


@pytest.mark.parametrize("with_select", [False, True], ids=["plain", "select"])
def test_ten_thousand_decorate_call_drop_cycles_run_in_constant_memory(gl, with_select):
    gl.activate()
    _cycles(gl, 1000, with_select)  # warm: caches, free lists
    gl.clear()

    def work():
        _cycles(gl, 10_000, with_select)
        gl.clear()  # the entries themselves (ints) are what the user asked to keep

    grown = traced_growth(work)
    # A leak of one function, or one instrumented code object, per cycle is over 1 MB.
    assert grown < 64 * 1024, f"10,000 decorate/call/drop cycles kept {grown} bytes"


def test_a_thousand_capture_clear_cycles_run_in_constant_memory(gl):
    @gl("attn")
    def attention(x):
        attn = [x] * 100
        return attn

    def cycles(count):
        for call in range(count):
            with gl.capture() as cache:
                attention(call)
            assert len(cache["test_a_thousand_capture_clear_cycles_run_in_constant_memory."
                             "<locals>.attention"]) == 1
            gl.clear()

    cycles(100)
    grown = traced_growth(lambda: cycles(1000))
    assert grown < 64 * 1024, f"1,000 capture/clear cycles kept {grown} bytes"
