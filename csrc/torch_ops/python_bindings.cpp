// The module sa_kernels._C and its one function: a direct Python entry to the native
// forward for eager calls. torch.ops calls are boxed and cost several microseconds more
// per call than a built-in op; this parses its arguments as lean as torch's generated
// bindings and calls the op through the dispatcher (autograd in C++ included), so the
// fused module costs the host about what nn.GroupNorm does. Compiled graphs and tensor
// subclasses go through torch.ops instead (sa_kernels/functional.py decides).
#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "torch_ops/native_ops.h"

namespace {

constexpr const char* kTensorNames[7] = {"x",     "cweight",   "cbias",  "sweight",
                                         "sbias", "gn_weight", "gn_bias"};

// Releases the GIL for the op, as torch's own bindings do; restored on any exit.
struct GilRelease {
  PyThreadState* state = PyEval_SaveThread();
  ~GilRelease() { PyEval_RestoreThread(state); }
};

// shuffle_attention(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps) -> out
PyObject* shuffle_attention(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9) {
    PyErr_Format(PyExc_TypeError, "shuffle_attention() takes 9 arguments, got %zd", nargs);
    return nullptr;
  }
  const at::Tensor* tensors[7];
  for (int i = 0; i < 7; ++i) {
    if (!THPVariable_Check(args[i])) {
      PyErr_Format(PyExc_TypeError, "%s must be a torch.Tensor, got %s", kTensorNames[i],
                   Py_TYPE(args[i])->tp_name);
      return nullptr;
    }
    tensors[i] = &THPVariable_Unpack(args[i]);
  }
  if (PyBool_Check(args[7])) {  // an int to PyLong_AsLongLong; rejected as the Python checks do
    PyErr_Format(PyExc_ValueError, "groups must be a positive int, got %R", args[7]);
    return nullptr;
  }
  const long long groups = PyLong_AsLongLong(args[7]);
  if (groups == -1 && PyErr_Occurred()) return nullptr;
  const double eps = PyFloat_AsDouble(args[8]);
  if (eps == -1.0 && PyErr_Occurred()) return nullptr;
  at::Tensor out;
  {
    GilRelease no_gil;
    out = std::get<0>(sa_kernels::native::forward_op().call(
        *tensors[0], *tensors[1], *tensors[2], *tensors[3], *tensors[4], *tensors[5], *tensors[6],
        groups, eps));
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"shuffle_attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(shuffle_attention)),
     METH_FASTCALL, "The native forward's output, through the dispatcher (eager fast path)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module); }
