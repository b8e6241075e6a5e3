/* The three headers the bindings come from; build.rs runs bindgen over
 * this file and compiles bindgen's wrappers for their static inline
 * functions against it. */
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>
#include <rdma/rdma_verbs.h>
