"""`borrow(tables)`: the same namedtuple of arrays, with every array's reference count detached.

Why: numba reference-counts every array it passes to a compiled function that is not inlined
(an atomic increment on the way in and a decrement on the way out, per array). A Worker holds
some thirty arrays, so each call that took ``wk`` cost about a microsecond on the reference
machine (~24 ns per array: a locked instruction under virtualisation) -- more than the whole
established-packet path, and most of what a new connection cost. An array whose ``meminfo`` is
NULL is skipped by numba's incref/decref (a null test, no atomic), so `process_batch` borrows its
tables once per batch and passes the borrowed tuple down.

Safe because the borrowed views never outlive the call that made them: the caller's own
references (the backend's Python objects) keep the memory alive throughout, and nothing in the
engine stores an array anywhere. The views must not be returned to Python.
"""

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def borrow(typingctx, tup):
    if not isinstance(tup, (types.BaseNamedTuple, types.BaseTuple)):
        return None
    if not all(isinstance(t, types.Array) for t in tup):
        return None
    sig = tup(tup)

    def codegen(context, builder, signature, args):
        tupty = signature.args[0]
        out = []
        for i, aty in enumerate(tupty):
            val = builder.extract_value(args[0], i)
            ary = context.make_array(aty)(context, builder, val)
            ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
            ary.parent = cgutils.get_null_value(ary.parent.type)
            out.append(ary._getvalue())
        return context.make_tuple(builder, signature.return_type, out)

    return sig, codegen
