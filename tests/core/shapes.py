"""Function shapes that break naive bytecode rewrites, each with calls to make.

SHAPES: name -> (function, captured names, list of (args, kwargs)).
Functions are undecorated; tests decorate them. Valid on Python 3.9+.
"""
import asyncio
import functools

import numpy as np


class Resource:
    """A context manager that can suppress exceptions."""

    def __init__(self, suppress=False):
        self.suppress = suppress

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.suppress

    def __eq__(self, other):
        return type(other) is Resource and other.suppress == self.suppress


def straight(x):
    y = x * 2
    return y + 1


def early_return(x):
    y = x * 2
    if x > 3:
        return -1
    z = y + 1
    return z


def return_in_with(x):
    with Resource() as res:
        y = [x, res.suppress]
        return y


def return_in_try_finally(x):
    y = 0
    try:
        y = x + 1
        return y
    finally:
        z = y * 10  # noqa: F841  (captured)


def return_in_except(x):
    y = 1
    try:
        if x:
            raise ValueError("bad")
        y = 2
    except ValueError as e:
        message = str(e)
        return message
    return y


def exception_name_after_handler(x):
    try:
        if x:
            raise KeyError(x)
    except KeyError as e:
        kind = type(e).__name__
    else:
        kind = "none"
    return kind


def no_return(x):
    y = x + 1
    x = y * 2


def comprehension(x):
    i = "outer"
    squares = [i * i for i in range(x)]
    return squares, i


def cell_variable(x):
    y = x + 1

    def inner():
        return y * 2

    doubled = inner()
    y = doubled + 1
    return y


def lambda_cell(x):
    scale = x
    f = lambda v: v * scale  # noqa: E731
    out = f(3)
    return out


def unbound_on_path(flag):
    if flag:
        value = 42
    return 0


def never_bound_on_any_path(x):
    if x is None:  # never true in the calls made
        ghost = 1  # noqa: F841
    return x


def star_arguments(a, *args, key=1, **kwargs):
    total = a + sum(args) + key + sum(kwargs.values())
    return total


def reassigned_argument(x):
    x = x * 3
    x += 1
    return x


def recursion(n):
    depth = n
    if n <= 0:
        return 0
    return 1 + recursion(n - 1) + depth * 0


def generator(n):
    acc = 0
    for i in range(n):
        acc += i
        yield acc
    final = acc * 2
    return final


async def coroutine(x):
    await asyncio.sleep(0)
    y = x + 1
    await asyncio.sleep(0)
    return y


def raises_after_assignment(x):
    y = x + 1
    if y > 2:
        raise RuntimeError(f"too big: {y}")
    return y


def loops_with_returns(items):
    found = None
    for index, item in enumerate(items):
        if item < 0:
            continue
        if item == 99:
            found = index
            break
        if item == 42:
            return ("early", index)
    else:
        found = -1
    count = 0
    while count < 3:
        count += 1
    return (found, count)


def deleted(x):
    y = x + 1
    z = y
    del y
    if x:
        y = 5
    return z


def deleted_in_try(x):
    y = 1
    try:
        del y
        if x:
            raise ValueError
        y = 2
    except ValueError:
        return "handled"
    return y


def nested_try(x):
    a = 0
    try:
        a = 1
        try:
            if x == 1:
                raise ValueError
            a = 2
            if x == 2:
                return "inner"
        except ValueError:
            a = 3
            return "handled"
        finally:
            b = a * 10
    finally:
        c = a + 100  # noqa: F841
    return b


def return_in_finally_overrides(x):
    r = 0
    try:
        r = 1
        return r
    finally:
        r = 2
        if x:
            return r  # noqa: B012


def suppressed_in_with(x):
    y = 0
    with Resource(suppress=True):
        y = 1
        if x:
            raise ValueError
        y = 2
    return y


def arrays(n):
    attn = np.ones((2, n)) / n
    attn = attn * 2
    return attn.sum()


def several_names(x):
    q = x + 1
    k = x + 2
    v = q * k
    return v


def inner_free_variable_factory(x):
    outer = x * 2

    def inner(y):
        total = outer + y
        return total

    return inner


def wrapped_target(x):
    attn = x * 10
    return attn + 1


def wraps_decorator(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        result = func(*args, **kwargs)
        return result

    return wrapper


class Model:
    def method(self, x):
        attn = [x, x]
        return len(attn)

    @staticmethod
    def static(x):
        attn = x + 1
        return attn

    @classmethod
    def klass(cls, x):
        attn = (cls.__name__, x)
        return attn


SHAPES = {
    "straight": (straight, ("y",), [((1,), {}), ((5,), {})]),
    "early_return": (early_return, ("y", "z"), [((1,), {}), ((5,), {})]),
    "return_in_with": (return_in_with, ("y", "res"), [((3,), {})]),
    "return_in_try_finally": (return_in_try_finally, ("y", "z"), [((3,), {})]),
    "return_in_except": (return_in_except, ("y", "e", "message"), [((0,), {}), ((1,), {})]),
    "exception_name_after_handler": (
        exception_name_after_handler,
        ("e", "kind"),
        [((0,), {}), ((1,), {})],
    ),
    "no_return": (no_return, ("x", "y"), [((3,), {})]),
    "comprehension": (comprehension, ("i", "squares"), [((4,), {}), ((0,), {})]),
    "cell_variable": (cell_variable, ("y", "doubled"), [((1,), {})]),
    "lambda_cell": (lambda_cell, ("scale", "out"), [((4,), {})]),
    "unbound_on_path": (unbound_on_path, ("value",), [((True,), {}), ((False,), {})]),
    "never_bound_on_any_path": (never_bound_on_any_path, ("ghost",), [((7,), {})]),
    "star_arguments": (
        star_arguments,
        ("a", "args", "key", "kwargs", "total"),
        [((1, 2, 3), {"key": 4, "extra": 5}), ((1,), {})],
    ),
    "reassigned_argument": (reassigned_argument, ("x",), [((2,), {})]),
    "recursion": (recursion, ("depth",), [((3,), {})]),
    "raises_after_assignment": (raises_after_assignment, ("y",), [((0,), {}), ((5,), {})]),
    "loops_with_returns": (
        loops_with_returns,
        ("found", "count", "index", "item"),
        [(([1, -1, 99],), {}), (([1, 42],), {}), (([],), {}), (([1, 2],), {})],
    ),
    "deleted": (deleted, ("y", "z"), [((0,), {}), ((1,), {})]),
    "deleted_in_try": (deleted_in_try, ("y",), [((0,), {}), ((1,), {})]),
    "nested_try": (nested_try, ("a", "b", "c"), [((0,), {}), ((1,), {}), ((2,), {})]),
    "return_in_finally_overrides": (
        return_in_finally_overrides,
        ("r",),
        [((0,), {}), ((1,), {})],
    ),
    "suppressed_in_with": (suppressed_in_with, ("y",), [((0,), {}), ((1,), {})]),
    "arrays": (arrays, ("attn",), [((4,), {})]),
    "several_names": (several_names, ("q", "k", "v"), [((1,), {})]),
}
