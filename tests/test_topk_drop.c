/// @file test_topk_drop.c
/// desc.invalid_topk: precomputed routing indices outside [0, E).
/// - MOE_TOPK_INVALID_ERROR (default): the forward fails with
///   MOE_ERR_INVALID_ARGUMENT naming the slot (negative and >= E indices).
/// - MOE_TOPK_INVALID_DROP: the dropped slots contribute nothing. The run
///   must match a run where the same slots point at a real expert with
///   routing weight 0 (output, grad_hidden, weight gradients), and the
///   dropped slots' routing-weight gradient must be exactly 0.
/// Built twice: for the CPU (ctest test_topk_drop) and, with
/// TOPK_DROP_CUDA, for the GPU (test_cuda_topk_drop; skipped without a GPU),
/// where the same cases also run on the CPU and the two must agree.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "testutil.h"
#ifdef TOPK_DROP_CUDA
#include <cuda_runtime.h>

#include "moe_cuda.h"
#endif

enum { T = 37, E = 7, H = 29, I = 13, K = 3 };

typedef struct {
  float out[T * H], ghid[T * H], gtopk[T * K];
  float gwgu[E * 2 * I * H], gwd[E * H * I];
  moe_status fs, bs;
  char err[256];
} res;

typedef struct {
  moe_dtype dt;
  double x[T * H], wgu[E * 2 * I * H], wd[E * H * I], gout[T * H];
  double tw[T * K];
  int64_t ti[T * K];
} inputs;

/* device mirror of a host buffer (CUDA build), or the host buffer itself */
static void *dev_of(void *host, size_t bytes, int cuda) {
#ifdef TOPK_DROP_CUDA
  if (cuda) {
    void *d = NULL;
    if (cudaMalloc(&d, bytes) != cudaSuccess) return NULL;
    cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice);
    return d;
  }
#endif
  (void)bytes;
  (void)cuda;
  return host;
}

static void dev_back(void *host, void *dev, size_t bytes, int cuda) {
#ifdef TOPK_DROP_CUDA
  if (cuda) {
    cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost);
    cudaFree(dev);
  }
#endif
  (void)host;
  (void)dev;
  (void)bytes;
  (void)cuda;
}

/* a tensor of dtype dt from doubles, on the device when cuda */
typedef struct {
  moe_tensor t;
  void *host;
  size_t bytes;
} tens;

static tens tens_make(moe_dtype dt, int nd, const int64_t *shape,
                      const double *v, int cuda) {
  tens r;
  r.t = moe_tensor_make(NULL, dt, nd, shape);
  int64_t n = moe_tensor_numel(&r.t);
  r.bytes = (size_t)n * moe_dtype_size(dt);
  r.host = tu_alloc(r.bytes);
  r.t.data = r.host;
  if (v) {
    tu_scatter(&r.t, v);
  } else {
    memset(r.host, 0, r.bytes);
  }
  r.t.data = dev_of(r.host, r.bytes, cuda);
  if (cuda) r.t.device.type = MOE_DEVICE_CUDA;
  return r;
}

/* copies back (CUDA), reads as f32, frees */
static void tens_take(tens *r, float *outv, int cuda) {
  dev_back(r->host, r->t.data, r->bytes, cuda);
  moe_tensor h = r->t;
  h.data = r->host;
  h.device.type = MOE_DEVICE_CPU;
  if (outv) tu_gather(&h, outv);
  free(r->host);
}

static void run(const inputs *in, moe_topk_invalid pol, int cuda, int strict,
                res *r) {
  memset(r, 0, sizeof *r);
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = E;
  d.hidden = H;
  d.intermediate = I;
  d.top_k = K;
  d.max_tokens = T;
  d.norm_topk_prob = 0;
  d.dtype = in->dt;
  d.method = MOE_GMM_GROUPED;
  d.strict = strict;
  d.invalid_topk = pol;
  if (cuda) d.device.type = MOE_DEVICE_CUDA;
  moe_layer_plan *plan = NULL;
  CHECK_STATUS(moe_layer_plan_create(&plan, &d), MOE_SUCCESS);
  if (!plan) return;
  int64_t sx[2] = {T, H}, sk[2] = {T, K}, sgu[3] = {E, 2 * I, H},
          sd[3] = {E, H, I};
  tens x = tens_make(in->dt, 2, sx, in->x, cuda);
  tens ti = tens_make(MOE_I64, 2, sk, NULL, cuda);
  /* i64 indices: written exactly (tu_scatter is for floats) */
  memcpy(ti.host, in->ti, sizeof in->ti);
#ifdef TOPK_DROP_CUDA
  if (cuda) cudaMemcpy(ti.t.data, ti.host, ti.bytes, cudaMemcpyHostToDevice);
#endif
  tens tw = tens_make(MOE_F32, 2, sk, in->tw, cuda);
  tens wgu = tens_make(in->dt, 3, sgu, in->wgu, cuda);
  tens wd = tens_make(in->dt, 3, sd, in->wd, cuda);
  tens out = tens_make(in->dt, 2, sx, NULL, cuda);
  tens gout = tens_make(in->dt, 2, sx, in->gout, cuda);
  tens ghid = tens_make(in->dt, 2, sx, NULL, cuda);
  tens gtw = tens_make(MOE_F32, 2, sk, NULL, cuda);
  tens gwgu = tens_make(in->dt, 3, sgu, NULL, cuda);
  tens gwd = tens_make(in->dt, 3, sd, NULL, cuda);
  size_t wsb = 0, svb = 0;
  CHECK_STATUS(moe_layer_plan_sizes(plan, T, &wsb, &svb), MOE_SUCCESS);
  char *saved_h = tu_alloc(svb ? svb : 1);
  void *saved = dev_of(saved_h, svb ? svb : 1, cuda);
  moe_layer_bwd_args ba;
  memset(&ba, 0, sizeof ba);
  ba.fwd.hidden = x.t;
  ba.fwd.topk_index = ti.t;
  ba.fwd.topk_weights = tw.t;
  ba.fwd.w_gate_up = wgu.t;
  ba.fwd.w_down = wd.t;
  ba.fwd.output = out.t;
  r->fs = moe_layer_forward(plan, &ba.fwd, saved, svb, NULL, 0, NULL);
  if (r->fs != MOE_SUCCESS)
    snprintf(r->err, sizeof r->err, "%s", moe_last_error());
  r->bs = MOE_ERR_INTERNAL;
  if (r->fs == MOE_SUCCESS) {
    ba.fwd.output = (moe_tensor){0};
    ba.grad_output = gout.t;
    ba.grad_hidden = ghid.t;
    ba.grad_topk_weights = gtw.t;
    ba.grad_w_gate_up = gwgu.t;
    ba.grad_w_down = gwd.t;
    r->bs = moe_layer_backward(plan, &ba, saved, svb, NULL, 0, NULL);
  }
#ifdef TOPK_DROP_CUDA
  if (cuda) cudaDeviceSynchronize();
#endif
  tens_take(&x, NULL, cuda);
  tens_take(&ti, NULL, cuda);
  tens_take(&tw, NULL, cuda);
  tens_take(&wgu, NULL, cuda);
  tens_take(&wd, NULL, cuda);
  tens_take(&out, r->out, cuda);
  tens_take(&gout, NULL, cuda);
  tens_take(&ghid, r->ghid, cuda);
  tens_take(&gtw, r->gtopk, cuda);
  tens_take(&gwgu, r->gwgu, cuda);
  tens_take(&gwd, r->gwd, cuda);
  dev_back(saved_h, saved, svb ? svb : 1, cuda);
  free(saved_h);
  moe_layer_plan_destroy(plan);
}

static double rel(const float *a, const float *b, int64_t n) {
  double *ref = tu_alloc((size_t)n * sizeof(double));
  for (int64_t i = 0; i < n; i++)
    ref[i] = a[i];
  double e = tu_rel_err(ref, b, n);
  free(ref);
  return e;
}

static void compare(const res *a, const res *b, double tol, const char *what) {
  CHECK_REL(rel(a->out, b->out, T * H), tol, what);
  CHECK_REL(rel(a->ghid, b->ghid, T * H), tol, what);
  CHECK_REL(rel(a->gwgu, b->gwgu, E * 2 * I * H), tol, what);
  CHECK_REL(rel(a->gwd, b->gwd, E * H * I), tol, what);
}

static void one_dtype(moe_dtype dt, int cuda) {
  static inputs in, ref; /* large: off the stack */
  tu_rng g = tu_rng_make(dt == MOE_F32 ? 11 : 12);
  in.dt = dt;
  tu_fill(&g, in.x, T * H, 1.0, dt);
  tu_fill(&g, in.wgu, E * 2 * I * H, 0.3, dt);
  tu_fill(&g, in.wd, E * H * I, 0.3, dt);
  tu_fill(&g, in.gout, T * H, 1.0, dt);
  tu_fill(&g, in.tw, T * K, 1.0, MOE_F32);
  /* about a third of the slots out of range (HF's EP sentinel E_local,
     larger values and negatives); token 5 has all k slots dropped */
  for (int i = 0; i < T * K; i++) {
    int64_t v = tu_below(&g, E + 4);
    if (v == E + 3) v = -1 - tu_below(&g, 3);
    in.ti[i] = v;
  }
  for (int j = 0; j < K; j++)
    in.ti[5 * K + j] = E;
  in.ti[0] = E; /* the first slot is bad: the error names [0][0] */
  ref = in;
  int ndrop = 0;
  for (int i = 0; i < T * K; i++)
    if (in.ti[i] < 0 || in.ti[i] >= E) {
      ref.ti[i] = i % E;
      ref.tw[i] = 0.0;
      ndrop++;
    }
  CHECK(ndrop > T * K / 6, "only %d dropped slots", ndrop);
  static res rd, rr, re;
  const char *dev = cuda ? "cuda" : "cpu";
  tu_case("%s %s invalid_topk=ERROR fails and names the slot", dev,
          moe_dtype_name(dt));
  run(&in, MOE_TOPK_INVALID_ERROR, cuda, 0, &re);
  CHECK_STATUS(re.fs, MOE_ERR_INVALID_ARGUMENT);
  CHECK(strstr(re.err, "topk_index[0][0]") != NULL, "message: %s", re.err);
  tu_case("%s %s invalid_topk=DROP vs zero-weight reference", dev,
          moe_dtype_name(dt));
  run(&in, MOE_TOPK_INVALID_DROP, cuda, cuda, &rd);
  run(&ref, MOE_TOPK_INVALID_ERROR, cuda, 0, &rr);
  CHECK_STATUS(rd.fs, MOE_SUCCESS);
  CHECK_STATUS(rd.bs, MOE_SUCCESS);
  CHECK_STATUS(rr.bs, MOE_SUCCESS);
  double tol = dt == MOE_F32 ? 1e-5 : 2e-2;
  compare(&rr, &rd, tol, "drop vs reference");
  int bad = 0, nz = 0;
  for (int i = 0; i < T * K; i++) {
    bool dropped = in.ti[i] < 0 || in.ti[i] >= E;
    if (dropped) bad += rd.gtopk[i] != 0.0f;
    if (!dropped) {
      double e = rd.gtopk[i] - rr.gtopk[i];
      double m = rr.gtopk[i] < 0 ? -rr.gtopk[i] : rr.gtopk[i];
      nz += (e < 0 ? -e : e) > tol * (1.0 + m) * 4;
    }
  }
  CHECK(bad == 0, "%d dropped slots have a nonzero routing-weight gradient",
        bad);
  CHECK(nz == 0, "%d kept slots' routing-weight gradients differ", nz);
  /* token 5: every slot dropped -> output row and grad_hidden row exactly 0 */
  int z = 0;
  for (int h = 0; h < H; h++)
    z += rd.out[5 * H + h] != 0.0f || rd.ghid[5 * H + h] != 0.0f;
  CHECK(z == 0, "token 5 (all slots dropped) has %d nonzero values", z);
#ifdef TOPK_DROP_CUDA
  if (cuda) {
    static res rc;
    tu_case("cuda %s invalid_topk=DROP agrees with the CPU",
            moe_dtype_name(dt));
    run(&in, MOE_TOPK_INVALID_DROP, 0, 0, &rc);
    compare(&rc, &rd, dt == MOE_F32 ? 1e-4 : 3e-2, "cuda vs cpu");
    tu_case("cuda %s invalid_topk=ERROR under strict mode", moe_dtype_name(dt));
    run(&in, MOE_TOPK_INVALID_ERROR, 1, 1, &re);
    CHECK_STATUS(re.fs, MOE_ERR_STRICT);
  }
#endif
}

int main(void) {
  int cuda = 0;
#ifdef TOPK_DROP_CUDA
  int n = 0;
  if (moe_cuda_device_count(&n) != MOE_SUCCESS || n < 1) {
    printf("skipped: no usable GPU (%s)\n", moe_last_error());
    return 77;
  }
  cuda = 1;
#endif
  one_dtype(MOE_F32, cuda);
  one_dtype(MOE_BF16, cuda);
  return tu_finish();
}
