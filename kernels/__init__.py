"""Compute kernels. Each module holds a kernel's launcher and `<name>_ref`, a torch twin with the
same signature; `dispatch` picks between them."""
