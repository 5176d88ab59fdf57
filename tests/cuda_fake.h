/* tests/cuda_fake.h: the CUDA driver, cuBLASLt and NCCL as host functions on host memory, so that
 * section 12's code runs without a GPU (tests/test_cuda_host.c, tests/test_cuda_emu.c). "Device"
 * pointers are host pointers; cublasLtMatmul is a plain column-major GEMM that reads back the
 * layouts and transposes medbot created (and checks they agree); kernels go to fake_kernel, which
 * the test sets (a non-zero answer is a failed launch); NCCL's collectives do nothing (no peer).
 * Failures are injected with fake_alloc_fail, fake_stream_busy and fake_nccl_*. Include after
 * test.h. */
#ifndef MB_CUDA_FAKE_H
#define MB_CUDA_FAKE_H

/* runs kernel k of emulator `lib` (the handle medbot launches encodes both) */
typedef int (*FakeKernelFn)(int lib, int k, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem,
                            void **args);
static FakeKernelFn fake_kernel;
static int launches[K_COUNT];
static int fake_alloc_fail;  /* cuMemAlloc answers CUDA_ERROR_OUT_OF_MEMORY */
static int fake_stream_busy; /* cuStreamQuery answers CUDA_ERROR_NOT_READY: queued work never finishes */

/* ---- the driver ---- */

static MbCuResult f_ok0(void) { return 0; }
static MbCuResult f_set_ctx(MbCuContext c) { return (void)c, 0; }
static MbCuResult f_sync(MbCuStream s) { return (void)s, 0; }
static MbCuResult f_alloc(MbCuDevPtr *p, size_t n) {
    if (fake_alloc_fail) return 2;
    *p = (MbCuDevPtr)(uintptr_t)calloc(1, n ? n : 1);
    return *p ? 0 : 2;
}
static MbCuResult f_free(MbCuDevPtr p) { return free((void *)(uintptr_t)p), 0; }
static MbCuResult f_htod(MbCuDevPtr d, const void *s, size_t n, MbCuStream st) {
    (void)st;
    memcpy((void *)(uintptr_t)d, s, n);
    return 0;
}
static MbCuResult f_dtoh(void *d, MbCuDevPtr s, size_t n, MbCuStream st) {
    (void)st;
    memcpy(d, (const void *)(uintptr_t)s, n);
    return 0;
}
static MbCuResult f_memset(MbCuDevPtr d, unsigned char v, size_t n, MbCuStream st) {
    (void)st;
    memset((void *)(uintptr_t)d, v, n);
    return 0;
}
static MbCuResult f_info(size_t *free_b, size_t *total) {
    *free_b = (size_t)60 << 30, *total = (size_t)80 << 30;
    return 0;
}
static MbCuResult f_err(MbCuResult r, const char **s) {
    (void)r;
    *s = "fake";
    return 0;
}

static MbCuResult f_release(MbCuDevice d) { return (void)d, 0; }
static MbCuResult f_device(MbCuDevice *d, int ordinal) { return *d = ordinal, 0; }
static int fake_handle; /* what the opaque handles below point at */
static MbCuResult f_retain(MbCuContext *c, MbCuDevice d) { return (void)d, *c = (MbCuContext)(void *)&fake_handle, 0; }
static MbCuResult f_stream_new(MbCuStream *s, unsigned f) { return (void)f, *s = (MbCuStream)(void *)&fake_handle, 0; }
static MbCuResult f_stream_free(MbCuStream s) { return (void)s, 0; }
static MbCuResult f_query(MbCuStream s) { return (void)s, fake_stream_busy ? 600 : 0; }

static MbCuResult f_launch(MbCuFunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                           unsigned smem, MbCuStream s, void **args, void **extra) {
    (void)by, (void)bz, (void)s, (void)extra;
    int h = (int)(uintptr_t)f - 1, k = h % 256;
    launches[k]++;
    return fake_kernel(h / 256, k, gx, gy, gz, bx, smem, args) ? 1 : 0;
}

/* ---- cuBLASLt: layouts and descriptors remember what medbot set ---- */

typedef struct {
    int type;
    uint64_t rows, cols;
    int64_t ld;
} FakeLayout;
typedef struct {
    int ta, tb;
} FakeDesc;

static MbLtStatus l_layout(MbLtLayout *l, MbLtDataType t, uint64_t r, uint64_t c, int64_t ld) {
    FakeLayout *f = mb_calloc(1, sizeof *f);
    f->type = (int)t, f->rows = r, f->cols = c, f->ld = ld;
    *l = (MbLtLayout)(void *)f;
    return 0;
}
static MbLtStatus l_layout_free(MbLtLayout l) { return free((void *)l), 0; }
static MbLtStatus l_desc(MbLtDesc *d, MbLtCompute c, MbLtDataType s) {
    CHECK((int)c == 68 && (int)s == 0, "compute fp32, scale fp32");
    *d = (MbLtDesc)(void *)mb_calloc(1, sizeof(FakeDesc));
    return 0;
}
static MbLtStatus l_desc_free(MbLtDesc d) { return free((void *)d), 0; }
static MbLtStatus l_desc_set(MbLtDesc d, MbLtDescAttr a, const void *buf, size_t n) {
    FakeDesc *f = (FakeDesc *)(void *)d;
    int32_t v;
    CHECK(n == sizeof v, "int32 attribute");
    memcpy(&v, buf, sizeof v);
    if ((int)a == 3) f->ta = v;
    else if ((int)a == 4) f->tb = v;
    return 0;
}
static MbLtStatus l_pref(MbLtPref *p) { return *p = (MbLtPref)(void *)mb_calloc(1, 8), 0; }
static MbLtStatus l_pref_free(MbLtPref p) { return free((void *)p), 0; }
static MbLtStatus l_pref_set(MbLtPref p, MbLtPrefAttr a, const void *b, size_t n) { return (void)p, (void)a, (void)b, (void)n, 0; }
static MbLtStatus l_heur(MbLtHandle h, MbLtDesc d, MbLtLayout a, MbLtLayout b, MbLtLayout c, MbLtLayout dd, MbLtPref p,
                         int req, MbLtHeuristic *res, int *n) {
    (void)h, (void)d, (void)a, (void)b, (void)c, (void)dd, (void)p, (void)req;
    memset(res, 0, sizeof *res);
    *n = 1;
    return 0;
}
static float load_el(const void *p, int type, size_t i) {
    if (type == 14) return bf16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}
static int gemms;
/* D = alpha op(A) op(B) + beta C, column-major, checking that the layouts agree with the ops */
static MbLtStatus l_matmul(MbLtHandle h, MbLtDesc desc, const void *alpha, const void *A, MbLtLayout la, const void *B,
                           MbLtLayout lb, const void *beta, const void *C, MbLtLayout lc, void *D, MbLtLayout ld,
                           const MbLtAlgo *algo, void *ws, size_t wsn, MbCuStream s) {
    (void)h, (void)algo, (void)ws, (void)wsn, (void)s;
    const FakeDesc *d = (const FakeDesc *)(void *)desc;
    const FakeLayout *a = (const FakeLayout *)(void *)la, *b = (const FakeLayout *)(void *)lb, *c = (const FakeLayout *)(void *)lc;
    size_t m = c->rows, n = c->cols, k = d->ta ? a->rows : a->cols;
    CHECK(lc == ld && C == D, "D written over C");
    CHECK((d->ta ? a->cols : a->rows) == m && (d->tb ? b->rows : b->cols) == n && (d->tb ? b->cols : b->rows) == k,
          "GEMM shapes disagree: A %llux%llu%s B %llux%llu%s C %zux%zu", (unsigned long long)a->rows,
          (unsigned long long)a->cols, d->ta ? "^T" : "", (unsigned long long)b->rows, (unsigned long long)b->cols,
          d->tb ? "^T" : "", m, n);
    CHECK(a->ld >= (int64_t)a->rows && b->ld >= (int64_t)b->rows && c->ld >= (int64_t)c->rows, "ld >= rows");
    CHECK(a->type == 14 && b->type == 14, "bf16 operands");
    float al, be;
    memcpy(&al, alpha, 4), memcpy(&be, beta, 4);
    float *out = mb_malloc(m * n * sizeof(float) + 4);
    for (size_t j = 0; j < n; j++)
        for (size_t i = 0; i < m; i++) {
            float acc = 0;
            for (size_t p = 0; p < k; p++) {
                float x = load_el(A, a->type, d->ta ? p + i * (size_t)a->ld : i + p * (size_t)a->ld);
                float y = load_el(B, b->type, d->tb ? j + p * (size_t)b->ld : p + j * (size_t)b->ld);
                acc += x * y;
            }
            size_t ci = i + j * (size_t)c->ld;
            out[i + j * m] = al * acc + (be != 0 ? be * load_el(C, c->type, ci) : 0);
        }
    for (size_t j = 0; j < n; j++)
        for (size_t i = 0; i < m; i++) {
            size_t ci = i + j * (size_t)c->ld;
            if (c->type == 14) ((uint16_t *)D)[ci] = f32_to_bf16(out[i + j * m]);
            else ((float *)D)[ci] = out[i + j * m];
        }
    free(out);
    gemms++;
    return 0;
}
static const char *l_status(MbLtStatus s) { return (void)s, "fake"; }

static MbLtStatus l_destroy(MbLtHandle h) { return (void)h, 0; }

/* ---- NCCL: a communicator without peers; its calls fail as the knobs say ---- */

static int fake_nccl_fail;  /* the collectives' calls return this (0: they work) */
static int fake_nccl_async; /* ncclCommGetAsyncError reports this */
static int nccl_calls, nccl_aborts, nccl_destroys;
#define FAKE_NCCL_COMM ((MbNcclComm_t)(void *)&fake_handle)

static MbNcclResult n_reduce(const void *s, void *r, size_t n, MbNcclDataType t, MbNcclRedOp op, MbNcclComm_t c,
                             MbCuStream st) {
    (void)s, (void)r, (void)n, (void)t, (void)op, (void)c, (void)st;
    return nccl_calls++, fake_nccl_fail;
}
static MbNcclResult n_gather(const void *s, void *r, size_t n, MbNcclDataType t, MbNcclComm_t c, MbCuStream st) {
    (void)s, (void)r, (void)n, (void)t, (void)c, (void)st;
    return nccl_calls++, fake_nccl_fail;
}
static MbNcclResult n_bcast(const void *s, void *r, size_t n, MbNcclDataType t, int root, MbNcclComm_t c, MbCuStream st) {
    (void)s, (void)r, (void)n, (void)t, (void)root, (void)c, (void)st;
    return nccl_calls++, fake_nccl_fail;
}
static MbNcclResult n_async(MbNcclComm_t c, MbNcclResult *e) { return (void)c, *e = fake_nccl_async, 0; }
static MbNcclResult n_abort(MbNcclComm_t c) { return (void)c, nccl_aborts++, 0; }
static MbNcclResult n_destroy(MbNcclComm_t c) { return (void)c, nccl_destroys++, 0; }
static const char *n_error(MbNcclResult r) { return (void)r, "unhandled system error (fake)"; }

static MbCudaLibs fake_libs;

static void fake_libs_init(void) {
    MbCudaLibs *L = &fake_libs;
    L->cu.cuCtxSetCurrent = f_set_ctx, L->cu.cuCtxSynchronize = f_ok0, L->cu.cuStreamSynchronize = f_sync;
    L->cu.cuMemAlloc = f_alloc, L->cu.cuMemFree = f_free, L->cu.cuMemcpyHtoDAsync = f_htod;
    L->cu.cuMemcpyDtoHAsync = f_dtoh, L->cu.cuMemsetD8Async = f_memset, L->cu.cuMemGetInfo = f_info;
    L->cu.cuLaunchKernel = f_launch, L->cu.cuGetErrorName = f_err, L->cu.cuGetErrorString = f_err;
    L->cu.cuDevicePrimaryCtxRelease = f_release, L->cu.cuDeviceGet = f_device, L->cu.cuDevicePrimaryCtxRetain = f_retain;
    L->cu.cuStreamCreate = f_stream_new, L->cu.cuStreamDestroy = f_stream_free, L->cu.cuStreamQuery = f_query;
    L->lt.cublasLtMatrixLayoutCreate = l_layout, L->lt.cublasLtMatrixLayoutDestroy = l_layout_free;
    L->lt.cublasLtMatmulDescCreate = l_desc, L->lt.cublasLtMatmulDescDestroy = l_desc_free;
    L->lt.cublasLtMatmulDescSetAttribute = l_desc_set, L->lt.cublasLtMatmulPreferenceCreate = l_pref;
    L->lt.cublasLtMatmulPreferenceDestroy = l_pref_free, L->lt.cublasLtMatmulPreferenceSetAttribute = l_pref_set;
    L->lt.cublasLtMatmulAlgoGetHeuristic = l_heur, L->lt.cublasLtMatmul = l_matmul;
    L->lt.cublasLtGetStatusString = l_status, L->lt.cublasLtDestroy = l_destroy;
    L->nccl.ncclAllReduce = n_reduce, L->nccl.ncclReduceScatter = n_reduce, L->nccl.ncclAllGather = n_gather;
    L->nccl.ncclBroadcast = n_bcast, L->nccl.ncclCommGetAsyncError = n_async, L->nccl.ncclCommAbort = n_abort;
    L->nccl.ncclCommDestroy = n_destroy, L->nccl.ncclGetErrorString = n_error;
}

/* The CUDA backend (section 12's op table and state) on the fake driver, for head dim D; its
 * kernels go to emulator `lib`; params: the kernels' mb_kernel_params (attention tiles). */
static MbOps *fake_cuda_ops(int D, int lib, const int params[6]) {
    if (!fake_libs.cu.cuLaunchKernel) fake_libs_init();
    MbCuda *g = mb_calloc(1, sizeof *g);
    g->lib = &fake_libs, g->head_dim = D, g->sms = 4, g->cc = 90;
    g->ctx = (MbCuContext)(void *)g, g->lt = (MbLtHandle)(void *)g; /* non-null: started */
    g->tile_bytes = MB_CUDA_TILE_BYTES, g->lp_rows = MB_CUDA_LP_ROWS, g->lp_vocab = MB_CUDA_LP_VOCAB;
    for (int k = 0; k < K_COUNT; k++) g->fn[k] = (MbCuFunction)(uintptr_t)(lib * 256 + k + 1);
    snprintf(g->name, sizeof g->name, "emulated (head_dim %d)", D);
    snprintf(g->arch, sizeof g->arch, "host");
    if (params) g->att_fwd_smem = params[0], g->att_bwd_smem = params[1], g->att_bq = params[2], g->att_bk = params[3],
                g->att_bwd_bq = params[4], g->att_bwd_bk = params[5];
    g->lt_ws.bytes = 1024, g->lt_ws.p = cu_malloc(g, 1024);
    MbOps *ops = mb_calloc(1, sizeof *ops);
    ops->name = "cuda", ops->ctx = g, ops->act_size = 2, ops->destroy = cuda_destroy;
    cuda_ops_table(ops);
    return ops;
}
#endif /* MB_CUDA_FAKE_H */
