// A Python extension module: `import sa_kernels.<name>` loads the shared library, whose
// static initialisers register the ops with the dispatcher. `methods`: its functions, or
// nullptr.
#pragma once

#include <Python.h>

#define SA_KERNELS_PYTHON_MODULE(name, methods)                              \
  extern "C" PyObject* PyInit_##name(void) {                                  \
    static PyModuleDef module = {PyModuleDef_HEAD_INIT, #name, nullptr, -1,    \
                                 methods, nullptr, nullptr, nullptr, nullptr}; \
    return PyModule_Create(&module);                                           \
  }
