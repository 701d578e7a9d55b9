// The extension's Python module is empty: importing it runs the TORCH_LIBRARY registrations in the other
// translation units, and the ops are called through torch.ops. No pybind11, which keeps the build short.
#include <Python.h>

#define DGR_FAST_CONCAT_(a, b) a##b
#define DGR_FAST_CONCAT(a, b) DGR_FAST_CONCAT_(a, b)
#define DGR_FAST_STR_(a) #a
#define DGR_FAST_STR(a) DGR_FAST_STR_(a)

extern "C" PyMODINIT_FUNC DGR_FAST_CONCAT(PyInit_, DGR_FAST_MODULE_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, DGR_FAST_STR(DGR_FAST_MODULE_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
