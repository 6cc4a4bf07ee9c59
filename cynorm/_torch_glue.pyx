"""The per-call glue of cynorm.torch's eager routes: from tensors to the kernels (called
as the NumPy API's checked entry points call them) and back. It runs on every call of a
cynorm.torch module, so it is compiled and kept to attribute reads, comparisons and
NumPy C-API allocations; everything uncommon (16-bit and
channels-last data, residuals, casts, arguments that need the public functions' checks
and error messages) is answered with None, and cynorm.torch then takes its general
route.

Imported only by cynorm.torch (it imports torch).

An op call is described by cynorm.torch's tuple p = (kind, num_groups, normalized_shape,
flag, momentum, eps, activation).
"""
cimport numpy as cnp
import numpy as np
import torch

from cynorm import _api, _pool
from cynorm._kernels import channel as _channel, row as _row, slab as _slab
from cynorm._validate import ACTIVATIONS

cnp.import_array()

_Tensor = torch.Tensor
_F32 = torch.float32
_F64 = torch.float64
_from_numpy = torch.from_numpy
_grad_enabled = torch.is_grad_enabled
_INF = float("inf")
_NP_F32 = np.dtype("float32")
_NP_F64 = np.dtype("float64")
# outputs of this many bytes and more come from the output cache (cynorm._pool), as the
# checked entries' outputs do
cdef Py_ssize_t _POOL_MIN = _pool.MIN_BYTES
_pool_empty_like = _pool.empty_like
# the kernels' entry points (the level chosen at import), called positionally
_row_forward, _row_backward = _row.forward, _row.backward
_slab_forward, _slab_backward = _slab.forward, _slab.backward
_channel_forward, _channel_backward = _channel.forward, _channel.backward

cdef enum:
    _MAX_DIMS = 16  # the most dimensions array_of wraps itself (more: Tensor.numpy())


def array_of(t):
    """t's memory as a writable, C-contiguous NumPy array (no copy), or None (see
    _array)."""
    return _array(t)


cdef object _array(t):
    """t's memory as a writable, C-contiguous NumPy array (no copy) when t is a
    contiguous float32/float64 CPU tensor (requiring grad or not; a plain torch.Tensor,
    not a subclass), else None.

    The array is made from t's data pointer through NumPy's C API, with t as its base
    (what Tensor.numpy() does, at about half the cost, and without the detach() a tensor
    that requires grad needs first)."""
    if type(t) is not _Tensor:
        return None
    dt = t.dtype
    cdef int typenum
    if dt is _F32:
        typenum = cnp.NPY_FLOAT32
    elif dt is _F64:
        typenum = cnp.NPY_FLOAT64
    else:
        return None
    if not t.is_contiguous() or not t.is_cpu or t.is_neg():
        return None
    shape = t.shape
    cdef Py_ssize_t nd = len(shape), i
    cdef cnp.npy_intp dims[_MAX_DIMS]
    cdef size_t address
    try:
        address = t.data_ptr()
    except RuntimeError:  # no storage (a functorch wrapper): the general route decides
        return None
    if address == 0 or nd > _MAX_DIMS:  # empty (NumPy would allocate for NULL data)
        return t.detach().numpy()
    for i in range(nd):
        dims[i] = shape[i]
    arr = cnp.PyArray_SimpleNewFromData(<int>nd, dims, typenum, <void*>address)
    cnp.set_array_base(arr, t)
    return arr


# ---- recording an autograd call --------------------------------------------------------
# torch.autograd.Function.apply is a Python wrapper (about 4 us per call) around the C
# apply: outside functorch transforms it only unwraps dead functorch wrappers, which
# record does itself. These are torch internals: a torch without them takes the public
# apply.
_function = None
_c_apply = None
_functorch_active = None
_unwrap_if_dead = None
_forward_general = None
_backward_general = None


def set_function(cls, forward_general, backward_general):
    """Make record apply the autograd Function cls (cynorm.torch's _ModuleFunction, whose
    forward and backward are function_forward and function_backward); forward_general
    and backward_general: the Function's own forward and backward (Python), for every
    call those leave to them.

    The autograd engine runs a node's backward through the `apply` method of torch's
    BackwardCFunction, a Python method that looks the backward up and calls it:
    cls's backward node class gets backward_apply in its place (it calls
    function_backward directly)."""
    global _function, _c_apply, _functorch_active, _unwrap_if_dead
    global _forward_general, _backward_general
    _function = cls
    _forward_general, _backward_general = forward_general, backward_general
    try:
        _c_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)
        _functorch_active = torch._C._are_functorch_transforms_active
        _unwrap_if_dead = torch._C._functorch.unwrap_if_dead
    except (AttributeError, KeyError):
        _c_apply = None
    node = getattr(cls, "_backward_cls", None)
    base = getattr(torch.autograd.function, "BackwardCFunction", None)
    if (node is not None and base is not None and "apply" in base.__dict__
            and node.apply is base.__dict__["apply"]):
        node.apply = backward_apply


cdef inline object _live(t):
    return t if t is None else (_unwrap_if_dead(t) if isinstance(t, _Tensor) else t)


def record(p, module, input, weight, bias, running_mean, running_var, residual):
    """cls.apply(p, module, input, weight, bias, running_mean, running_var, residual) for
    set_function's cls (what it does, faster)."""
    if _c_apply is None or _functorch_active():
        return _function.apply(p, module, input, weight, bias, running_mean, running_var,
                               residual)
    return _c_apply(p, module, _live(input), _live(weight), _live(bias),
                    _live(running_mean), _live(running_var), _live(residual))


cdef object _record_module(tuple p, module, input, weight, bias, rm, rv):
    """record(p, module, input, weight, bias, rm, rv, None) for a module's call without
    a residual: in the common case (input and the module's cached views on real
    memory), the input's array and the views go to function_forward as its `prep`
    argument. Tensors with memory are no functorch wrappers (those have none, and
    the views' tensors are the module's own objects), so nothing needs unwrapping."""
    if _c_apply is not None and not _functorch_active():
        x = _array(input)
        if x is not None:
            views = _views(module, weight, bias, rm, rv)
            if views is not None:
                return _c_apply(p, module, input, weight, bias, rm, rv, None, (x, views))
    return record(p, module, input, weight, bias, rm, rv, None)


cdef inline object _version(t):
    return None if t is None else t._version


def function_forward(ctx, p, module, input, weight, bias, running_mean, running_var,
                     residual, prep=None):
    """_ModuleFunction.forward: a module's common call (prep = (input's array, the
    module's views), from _record_module) runs here; everything else in
    forward_general.

    Its state for function_backward: ctx.state = (p, 2, mean, rstd, x, w, b, False,
    None, input, weight, bias, and their versions). The tensors are kept as
    attributes, not through save_for_backward (which costs more than the rest of the
    state together): function_backward makes torch's check that none of them was
    changed in place since (the backward reads their memory), and a double backward
    differentiates through them as they are."""
    cdef tuple views
    if prep is not None:
        x, views = prep
        w, b = views[0], views[1]
        res = _checked_forward(p, x, w, b, views[2], views[3], None, True)
        if res is not None:
            # (the bias is read by the backward only through an activation)
            ctx.state = (p, 2, res[2], res[3], x, w, b, False, None, input, weight,
                         bias, _version(input), _version(weight),
                         None if p[6] is None else _version(bias))
            return _from_numpy(res[0])
    return _forward_general(ctx, p, module, input, weight, bias, running_mean,
                            running_var, residual)


cdef int _unchanged(tuple state) except -1:
    """torch's RuntimeError when a tensor of function_forward's state that the backward
    reads (input, weight, and bias with an activation: those with a version) was
    changed in place since the forward."""
    cdef int i
    for i in range(9, 12):
        t = state[i]
        if state[i + 3] is not None and t._version != state[i + 3]:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified "
                f"by an inplace operation: [{t.type()} {list(t.shape)}] is at version "
                f"{t._version}; expected version {state[i + 3]} instead (cynorm.torch's "
                "backward reads the forward's input and parameters)")
    return 0


def function_backward(ctx, dy, dh=None):
    """_ModuleFunction.backward: the backward of a function_forward call that autograd
    need not differentiate (no create_graph) runs here; everything else in
    backward_general."""
    state = ctx.state
    if state[1] == 2:
        # nothing was saved, but reading saved_tensors is torch's own check that the
        # graph was not freed by an earlier backward ("backward through the graph a
        # second time")
        ctx.saved_tensors
        _unchanged(state)
        if not _grad_enabled():
            dyn = _array(dy)
            if dyn is not None:
                w, b = state[5], state[6]
                grads = _checked_backward(state[0], dyn, state[4], w, b, state[2],
                                          state[3])
                if grads is not None:
                    n = ctx.needs_input_grad
                    dx, dw, db = grads
                    return (None, None, _from_numpy(dx) if n[2] else None,
                            _from_numpy(dw) if n[3] and w is not None else None,
                            _from_numpy(db) if n[4] and db is not None and b is not None
                            else None,
                            None, None, None, None)
    return _backward_general(ctx, dy, dh)


def backward_apply(self, *grads):
    """The `apply` of _ModuleFunction's backward node (see set_function)."""
    return function_backward(self, *grads)


def cached_views(module, weight, bias, running_mean, running_var):
    """The NumPy views of a module's parameters and buffers that cynorm.torch keeps in
    the module's __dict__ (see cynorm.torch._module_views), or None when there are none
    or they are out of date: the module holds other tensor objects, or one of them now
    has other memory, shape or dtype (`.data =`, `.to()`)."""
    return _views(module, weight, bias, running_mean, running_var)


cdef object _views(module, weight, bias, running_mean, running_var):
    c = module.__dict__.get("_cynorm_views")
    if (c is None or c[0] is not weight or c[1] is not bias or c[2] is not running_mean
            or c[3] is not running_var):
        return None
    keys = c[4]
    if not (_same(weight, keys[0]) and _same(bias, keys[1]) and _same(running_mean, keys[2])
            and _same(running_var, keys[3])):
        return None
    return c[5]


cdef bint _same(t, k) except -1:
    """Whether tensor t (or None) still has the (address, shape, dtype) key k."""
    return t is None or (t.data_ptr() == k[0] and t.dtype is k[2] and t.shape == k[1])


def _running_ok(r, pshape):
    """Whether a running buffer's view can go to a checked entry unchecked: None, or a
    writable float array of the parameters' shape."""
    return r is None or (r.shape == pshape and r.dtype.kind == "f" and r.flags.writeable)


# ---- the checked entries, on arrays ----------------------------------------------------
# For a caller that has already made every check the public functions make: x (and dy)
# C-contiguous, aligned float32/float64 arrays; weight, bias (and residual) None or
# C-contiguous arrays of x's dtype and shape; num_groups >= 1 dividing C; eps a finite
# float >= 0; act a kernel code (_validate.ACTIVATIONS); running statistics (C,) arrays;
# mean and rstd those the matching forward returned. Each entry allocates the outputs
# (small ones through NumPy's C API, large ones from the output cache) and calls one
# kernel with the public functions' arguments, so the results are theirs; on a tiny
# call that halves the cost around the kernel.

cdef inline cnp.ndarray _empty_like(cnp.ndarray x):
    """An output of x's shape and dtype (x C-contiguous): a large one from the output
    cache."""
    if cnp.PyArray_NBYTES(x) >= _POOL_MIN:
        return _pool_empty_like(x)
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x),
                             0)


cdef inline cnp.ndarray _empty(int nd, cnp.npy_intp* dims, int typenum):
    return cnp.PyArray_EMPTY(nd, dims, typenum, 0)


cdef inline Py_ssize_t _prod(cnp.npy_intp* dims, int lo, int hi) noexcept:
    cdef Py_ssize_t n = 1
    cdef int i
    for i in range(lo, hi):
        n *= dims[i]
    return n


cdef tuple _row_fwd(cnp.ndarray x, int nd, w, b, double eps, bint rms, r):
    """layer_norm / rms_norm forward over the trailing nd dims (residual r or None):
    (y, h, mean, rstd), h = x + r (None without r), mean None for rms."""
    cdef int ndim = cnp.PyArray_NDIM(x)
    cdef int cut = ndim - nd
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    cdef Py_ssize_t R = _prod(dims, 0, cut), K = _prod(dims, cut, ndim)
    y = _empty_like(x)
    mean = _empty(cut, dims, cnp.NPY_FLOAT64)
    rstd = _empty(cut, dims, cnp.NPY_FLOAT64)
    if r is None:
        _row_forward(x, y, w, b, mean, rstd, R, K, eps, 0, rms)
        return y, None, mean, rstd
    h = _empty_like(x)
    _row_forward(x, y, w, b, mean, rstd, R, K, eps, 0, rms, 0.0, r, h)
    return y, h, mean, rstd


cdef tuple _slab_fwd(cnp.ndarray x, Py_ssize_t G, w, b, double eps, int act):
    """group_norm forward with G groups (G = C: instance_norm with input statistics):
    (y, mean, rstd)."""
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    cdef cnp.npy_intp sdims[2]
    sdims[0] = dims[0]
    sdims[1] = G
    y = _empty_like(x)
    mean = _empty(2, sdims, cnp.NPY_FLOAT64)
    rstd = _empty(2, sdims, cnp.NPY_FLOAT64)
    _slab_forward(x, y, w, b, mean, rstd, dims[0], dims[1],
                  _prod(dims, 2, cnp.PyArray_NDIM(x)), G, eps, 0, act)
    return y, mean, rstd


cdef cnp.ndarray _channel_eval(cnp.ndarray x, rm, rv, w, b, double eps, int act):
    """batch_norm forward with the running statistics rm, rv (any float dtype): y."""
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    cdef Py_ssize_t HW = _prod(dims, 2, cnp.PyArray_NDIM(x))
    y = _empty_like(x)
    if dims[0] * HW:
        _channel_forward(x, y, w, b,
                         cnp.PyArray_FROM_OTF(rm, cnp.NPY_FLOAT64, cnp.NPY_ARRAY_IN_ARRAY),
                         None,
                         cnp.PyArray_FROM_OTF(rv, cnp.NPY_FLOAT64, cnp.NPY_ARRAY_IN_ARRAY),
                         dims[0], dims[1], HW, eps, 0, 0, 0.0, None, act)
    return y


cdef tuple _channel_train(cnp.ndarray x, rm, rv, w, b, double eps, double momentum,
                          int act):
    """batch_norm forward in training: (y, mean, rstd), the running statistics rm, rv
    (None or both) updated as batch_norm updates them."""
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    cdef Py_ssize_t N = dims[0], C = dims[1], HW = _prod(dims, 2, cnp.PyArray_NDIM(x))
    cdef Py_ssize_t count = N * HW
    cdef cnp.npy_intp c = C
    y = _empty_like(x)
    mean = _empty(1, &c, cnp.NPY_FLOAT64)
    rstd = _empty(1, &c, cnp.NPY_FLOAT64)
    var = None if rv is None else _empty(1, &c, cnp.NPY_FLOAT64)
    _channel_forward(x, y, w, b, mean, rstd, var, N, C, HW, eps, 0, 1, 0.0, None, act)
    if rm is not None:
        _update(rm, momentum, mean, 1.0)
    if rv is not None:
        _update(rv, momentum, var, count / <double>(count - 1))
    return y, mean, rstd


cdef int _update(r, double momentum, cnp.ndarray stat, double scale) except -1:
    """_api._update_running(r, momentum, stat * scale) (stat: C-contiguous float64),
    computed here for a contiguous float32/float64 buffer with NumPy's arithmetic: a
    float32 r gets float32((float32(1 - momentum) * r) + momentum * stat * scale), the
    product's float32 rounding included, as NumPy forms it."""
    cdef cnp.ndarray a
    if (type(r) is not np.ndarray or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>r)
            or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>r)
            or cnp.PyArray_SIZE(<cnp.ndarray>r) != cnp.PyArray_SIZE(stat)):
        _api._update_running(r, momentum, stat if scale == 1.0 else stat * scale)
        return 0
    a = <cnp.ndarray>r
    cdef Py_ssize_t i, n = cnp.PyArray_SIZE(a)
    cdef double* s = <double*>cnp.PyArray_DATA(stat)
    cdef float* f
    cdef double* d
    cdef float keep32 = <float>(1.0 - momentum)
    cdef int typenum = cnp.PyArray_TYPE(a)
    if typenum == cnp.NPY_FLOAT32:
        f = <float*>cnp.PyArray_DATA(a)
        for i in range(n):
            f[i] = <float>(<double>(keep32 * f[i]) + momentum * (s[i] * scale))
    elif typenum == cnp.NPY_FLOAT64:
        d = <double*>cnp.PyArray_DATA(a)
        for i in range(n):
            d[i] = (1.0 - momentum) * d[i] + momentum * (s[i] * scale)
    else:
        _api._update_running(r, momentum, stat if scale == 1.0 else stat * scale)
    return 0


cdef tuple _row_bwd(cnp.ndarray dy, cnp.ndarray x, mean, rstd, int nd, w, bint rms):
    """layer_norm / rms_norm backward: (dx, dweight, dbias), dbias None for rms."""
    cdef int ndim = cnp.PyArray_NDIM(x)
    cdef int cut = ndim - nd
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    cdef int typenum = cnp.PyArray_TYPE(x)
    dx = _empty_like(x)
    dw = _empty(nd, dims + cut, typenum)
    db = None if rms else _empty(nd, dims + cut, typenum)
    _row_backward(dy, x, dx, w, dw, db, None if rms else mean, rstd, _prod(dims, 0, cut),
                  _prod(dims, cut, ndim), rms)
    return dx, dw, db


cdef tuple _per_channel_bwd(str kind, cnp.ndarray dy, cnp.ndarray x, mean, rstd,
                            Py_ssize_t G, w, b, int act, int training):
    """group_norm (kind "slab") or batch_norm backward: (dx, dweight, dbias)."""
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    cdef cnp.npy_intp c = dims[1]
    cdef int typenum = cnp.PyArray_TYPE(x)
    cdef Py_ssize_t HW = _prod(dims, 2, cnp.PyArray_NDIM(x))
    dx = _empty_like(x)
    dw = _empty(1, &c, typenum)
    db = _empty(1, &c, typenum)
    gbuf = dx if act else None  # dx is a new array, never x
    if kind == "slab":
        _slab_backward(dy, x, dx, w, dw, db, mean, rstd, dims[0], dims[1], HW, G, act, b,
                       gbuf)
    else:
        _channel_backward(dy, x, dx, w, dw, db, mean, rstd, dims[0], dims[1], HW,
                          training, act, b, gbuf)
    return dx, dw, db


def checked_forward(p, x, w, b, rm, rv, r, need_stats):
    """(y, h, mean, rstd) from the NumPy API's checked entries, for arguments checked
    cheaply here (the common case: float32/float64 x in (N, C, *spatial) layout,
    parameters of x's dtype and shape, a float eps); None when the call must go through
    the public functions' checks (which raise the errors, or cast, as they do), and for
    batch norm's running statistics when need_stats. h is None without a residual."""
    return _checked_forward(p, x, w, b, rm, rv, r, need_stats)


cdef object _checked_forward(tuple p, x, w, b, rm, rv, r, bint need_stats):
    kind, groups, shape, flag, momentum, eps, act = p
    if type(x) is not np.ndarray:
        return None
    dt = x.dtype
    if dt is not _NP_F32 and dt is not _NP_F64:
        return None
    if type(eps) is not float or not 0.0 <= eps < _INF:
        if not (eps is None and kind == "rms"):
            return None
        eps = float(np.finfo(dt).eps)
    per_row = kind == "layer" or kind == "rms"
    xs = x.shape
    if per_row:
        nd = len(shape)
        if not nd or xs[len(xs) - nd:] != shape:
            return None
        pshape = shape
    else:
        if len(xs) < 2:
            return None
        pshape = (xs[1],)
    if w is not None and (type(w) is not np.ndarray or w.dtype is not dt
                          or w.shape != pshape):
        return None
    if b is not None and (type(b) is not np.ndarray or b.dtype is not dt
                          or b.shape != pshape):
        return None
    if per_row:
        if r is not None and (type(r) is not np.ndarray or r.dtype is not dt
                              or r.shape != xs):
            return None
        return _row_fwd(x, nd, w, b, eps, kind == "rms", r)
    code = ACTIVATIONS[act]
    if kind == "group":
        if type(groups) is not int or groups < 1 or xs[1] % groups:
            return None
        y, mean, rstd = _slab_fwd(x, groups, w, b, eps, code)
        return y, None, mean, rstd
    if kind == "instance":
        if not flag or rm is not None or rv is not None or x.size <= xs[0] * xs[1]:
            return None
        y, mean, rstd = _slab_fwd(x, xs[1], w, b, eps, code)
        return y, None, mean, rstd
    if flag:  # batch norm with the batch's statistics
        if (type(momentum) is not float or not 0.0 <= momentum <= 1.0
                or x.size <= xs[1]
                or not _running_ok(rm, pshape) or not _running_ok(rv, pshape)):
            return None
        y, mean, rstd = _channel_train(x, rm, rv, w, b, eps, momentum, code)
        return y, None, mean, rstd
    if (need_stats or rm is None or rv is None or rm.shape != pshape
            or rv.shape != pshape):
        return None
    return _channel_eval(x, rm, rv, w, b, eps, code), None, None, None


def checked_backward(p, dy, x, w, b, mean, rstd):
    """(dx, dweight, dbias) from the checked entries, for a forward that went through
    checked_forward (so every argument but dy is known good); None when dy needs the
    public function's checks."""
    return _checked_backward(p, dy, x, w, b, mean, rstd)


cdef object _checked_backward(tuple p, dy, x, w, b, mean, rstd):
    if type(dy) is not np.ndarray or dy.dtype is not x.dtype or dy.shape != x.shape:
        return None
    kind, groups, shape, flag, momentum, eps, act = p
    if kind == "layer" or kind == "rms":
        return _row_bwd(dy, x, mean, rstd, len(shape), w, kind == "rms")
    code = ACTIVATIONS[act]
    if kind == "batch":
        return _per_channel_bwd("channel", dy, x, mean, rstd, 0, w,
                                None if act is None else b, code, 1 if flag else 0)
    G = groups if kind == "group" else x.shape[1]
    return _per_channel_bwd("slab", dy, x, mean, rstd, G, w, None if act is None else b,
                            code, 0)


def lean_module(module, p, input, weight, bias, running_mean, running_var):
    """A module's inference output (no autograd record) in the common case, or None:
    autograd must record the call, or the arguments need cynorm.torch's general route
    (which gives the same result, or the error)."""
    return _lean(module, p, input, weight, bias, running_mean, running_var)


cdef object _lean(module, tuple p, input, weight, bias, running_mean, running_var):
    if type(input) is not _Tensor or _needs_record(input, weight, bias):
        return None
    x = _array(input)
    if x is None:
        return None
    views = _views(module, weight, bias, running_mean, running_var)
    if views is None:
        return None
    res = _checked_forward(p, x, views[0], views[1], views[2], views[3], None, False)
    if res is None:
        return None
    return _from_numpy(res[0])


# ---- module forwards: the common inference call of each module, or None ------------------
# Each reads the module's attributes as its forward in cynorm.torch does and returns None
# for anything that forward must check or handle itself (it then runs in full).

cdef object _act(module):
    """The module's activation when valid (None included), else False."""
    act = module.activation
    if act is None or (type(act) is str and act in ACTIVATIONS):
        return act
    return False


def group_module(module, input):
    """GroupNorm.forward's call: an inference call run here, a call autograd must record
    handed to record (the checks of checked_forward for this kind,
    made here directly: the smallest calls are the ones this is for)."""
    if type(input) is not _Tensor:
        return None
    shape = input.shape
    if len(shape) < 2:
        return None
    C = shape[1]
    if C != module.num_channels:
        return None
    act = _act(module)
    G = module.num_groups
    eps = module.eps
    if (act is False or type(G) is not int or G < 1 or C % G or type(eps) is not float
            or not 0.0 <= eps < _INF):
        return None
    params = module._parameters
    weight, bias = params["weight"], params["bias"]
    if _needs_record(input, weight, bias):
        return _record_module(("group", G, None, True, 0.0, eps, act), module, input,
                              weight, bias, None, None)
    x = _array(input)
    if x is None:
        return None
    views = _views(module, weight, bias, None, None)
    if views is None:
        return None
    w, b = views[0], views[1]
    dt = x.dtype
    if not (_param_ok(w, dt, C) and _param_ok(b, dt, C)):
        return None
    return _from_numpy(_slab_fwd(x, G, w, b, eps, ACTIVATIONS[act])[0])


cdef bint _needs_record(input, weight, bias) except -1:
    """Whether autograd must record a call (cynorm.torch's _needs_grad)."""
    return _grad_enabled() and ((weight is not None and weight.requires_grad)
                                or (bias is not None and bias.requires_grad)
                                or input.requires_grad)


cdef bint _param_ok(a, dt, Py_ssize_t C) except -1:
    """Whether a per-channel parameter's view (or None) fits x's dtype and C channels."""
    return a is None or (a.dtype is dt and a.ndim == 1 and a.shape[0] == C)


def batch_module(module, input):
    """_BatchNorm.forward's call in eval mode with running statistics, and in training
    mode with tracked statistics and a float momentum (num_batches_tracked counted as
    torch counts it): an inference call run here, a call autograd must record handed to
    record; None for everything else."""
    if type(input) is not _Tensor or input.dim() not in module._cynorm_dims:
        return None
    act = _act(module)
    if act is False:
        return None
    buffers = module._buffers
    rm, rv = buffers["running_mean"], buffers["running_var"]
    if rm is None or rv is None:
        return None
    momentum = module.momentum
    params = module._parameters
    weight, bias = params["weight"], params["bias"]
    if not module.training:
        p = ("batch", 0, None, False, 0.0 if momentum is None else momentum, module.eps,
             act)
        return _lean(module, p, input, weight, bias, rm, rv)
    count = buffers.get("num_batches_tracked")
    if (type(momentum) is not float or not module.track_running_stats or count is None
            or type(count) is not _Tensor):
        return None
    p = ("batch", 0, None, True, momentum, module.eps, act)
    if _needs_record(input, weight, bias):
        count.add_(1)
        return _record_module(p, module, input, weight, bias, rm, rv)
    y = _lean(module, p, input, weight, bias, rm, rv)
    if y is not None:  # else the module's forward counts the batch and runs the call
        count.add_(1)
    return y


def row_module(module, input, kind):
    """LayerNorm.forward's (kind "layer") or RMSNorm.forward's ("rms") call without a
    residual, as group_module (the checks of checked_forward for these kinds, made here
    directly)."""
    if type(input) is not _Tensor:
        return None
    ns = module.normalized_shape
    eps = module.eps
    rms = kind == "rms"
    if type(ns) is not tuple or not ns:
        return None
    shape = input.shape
    nd = len(ns)
    if shape[len(shape) - nd:] != ns:
        return None
    params = module._parameters
    weight = params["weight"]
    bias = None if rms else params["bias"]
    if _needs_record(input, weight, bias):
        return _record_module((kind, 0, ns, True, 0.0, eps, None), module, input, weight,
                              bias, None, None)
    x = _array(input)
    if x is None:
        return None
    dt = x.dtype
    if type(eps) is not float or not 0.0 <= eps < _INF:
        if not (eps is None and rms):
            return None
        eps = float(np.finfo(dt).eps)
    views = _views(module, weight, bias, None, None)
    if views is None:
        return None
    w, b = views[0], views[1]
    if ((w is not None and (w.dtype is not dt or w.shape != ns))
            or (b is not None and (b.dtype is not dt or b.shape != ns))):
        return None
    return _from_numpy(_row_fwd(x, nd, w, b, eps, rms, None)[0])
