"""`prefetch(array, index)` (row `index` of a 1-D or 2-D array): LLVM's prefetch intrinsic for numba code.

The batch loop looks connections up in a table far larger than the caches (a million
connections is over 100 MiB of index and rows); touching every packet's index slot in a first
pass lets those cache misses overlap instead of stalling one packet after another.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def prefetch(typingctx, arr, idx):
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        # Row `idx` of a 2-D array: its first element.
        inds = [args[1]] + [ir.Constant(args[1].type, 0)] * (aryty.ndim - 1)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # read, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


HOT_ROW_BYTES = 40      # tables.CONN_DTYPE up to and including expire_ns: what every packet reads


@intrinsic
def prefetch_row(typingctx, arr, idx):
    """Prefetch the start of row `idx` of a record array and the line holding its byte
    HOT_ROW_BYTES - 1: a connection row is not line-aligned, so its hot fields can straddle."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        p0 = builder.bitcast(ptr, i8p)
        p1 = builder.gep(p0, [ir.Constant(i32, HOT_ROW_BYTES - 1)])
        builder.call(fn, [p0, i32(0), i32(3), i32(1)])
        builder.call(fn, [p1, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen
