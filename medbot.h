/* medbot.h: public API of medbot, a single-file C99 engine that trains (LoRA + DPO) and serves
 * a Llama-3.1 medical chatbot. The engine is medbot.c; this header is what a vendoring user
 * includes. Everything is plain C99: opaque handles, plain config structs, integer error codes.
 *
 * Table of contents (sections of medbot.c, in data-flow order)
 *   1. platform     errors, checked alloc/IO, mmap, thread pool, timers, JSON, RNG
 *   2. files        safetensors read (mmap, sharded) and write, config.json, dtype conversion
 *   3. tokenizer    Llama 3 byte-level BPE, specials, streaming UTF-8 decode
 *   4. weights      linear weights as f32/f16/bf16 or NF4 (bitsandbytes 4-bit, double quant)
 *   5. ops (CPU)    the op table MbOps: matmul, rmsnorm, rope, attention, swiglu, ...
 *   6. model        Llama-3.1 forward (prefill, decode with KV cache), written against MbOps
 *   7. lora         (LoRA issue)
 *   8. data         (DPO issue)
 *   9. dpo          (DPO issue)
 *  10. sampler      (generation issue)
 *  11. coordinator  (distributed issue)
 *  12. cuda         (CUDA issue; #ifdef MEDBOT_CUDA)
 *  13. cli          medbot info | init | ...; main() behind #ifndef MEDBOT_NO_MAIN
 *
 * Conventions: every function that can fail returns an MbStatus (MB_OK == 0) and leaves a
 * one-line message in mb_last_error() that names the file and the problem. Only the CLI exits.
 * Counts and byte offsets are size_t. Shapes use the legend at the top of medbot.c.
 */
#ifndef MEDBOT_H
#define MEDBOT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MEDBOT_VERSION "0.1.0"

typedef enum {
    MB_OK = 0,
    MB_ERR_ARG,         /* a bad argument or option */
    MB_ERR_IO,          /* a file could not be opened, read or written */
    MB_ERR_FORMAT,      /* a file is not what it claims to be (truncated, bad header, ...) */
    MB_ERR_UNSUPPORTED, /* valid input that medbot does not handle (a dtype, a rope type, ...) */
    MB_ERR_OOM,         /* out of memory */
    MB_ERR_DEVICE       /* GPU, driver or NCCL failure */
} MbStatus;

/* The message of the last failure on this thread: one line, "FILE: problem [--> hint]". */
const char *mb_last_error(void);

/* ---------- files ---------- */

/* safetensors dtypes (names as in the format) */
typedef enum {
    MB_DT_F32, MB_DT_F16, MB_DT_BF16, MB_DT_F64,
    MB_DT_I64, MB_DT_I32, MB_DT_I16, MB_DT_I8,
    MB_DT_U64, MB_DT_U32, MB_DT_U16, MB_DT_U8,
    MB_DT_BOOL, MB_DT_F8_E4M3, MB_DT_F8_E5M2,
    MB_DT_COUNT
} MbDtype;

#define MB_MAX_DIMS 8

typedef struct {
    const char *name;           /* tensor name, e.g. "model.layers.0.self_attn.q_proj.weight" */
    MbDtype dtype;
    int ndim;
    size_t shape[MB_MAX_DIMS];
    size_t numel;               /* product of shape */
    const void *data;           /* into the mapped file, little-endian, numel * dtype size bytes */
    size_t nbytes;
    const char *file;           /* the file that holds it */
} MbTensorInfo;

typedef struct MbSafetensors MbSafetensors; /* one file or a sharded checkpoint, mapped */

/* Opens PATH: a .safetensors file, a model.safetensors.index.json, or a folder holding either. */
MbStatus mb_safetensors_open(const char *path, MbSafetensors **out);
void mb_safetensors_close(MbSafetensors *st);
size_t mb_safetensors_count(const MbSafetensors *st);
const MbTensorInfo *mb_safetensors_at(const MbSafetensors *st, size_t i);
const MbTensorInfo *mb_safetensors_find(const MbSafetensors *st, const char *name);

/* A tensor to write: data is host memory in the given dtype. */
typedef struct {
    const char *name;
    MbDtype dtype;
    int ndim;
    size_t shape[MB_MAX_DIMS];
    const void *data;
} MbTensorOut;

/* Writes a single-file safetensors (to PATH.tmp, then renamed). metadata: NULL or pairs of
 * key/value strings, NULL-terminated. */
MbStatus mb_safetensors_write(const char *path, const MbTensorOut *tensors, size_t n,
                              const char *const *metadata);

/* ---------- model ---------- */

typedef struct {
    int hidden_size;              /* C */
    int intermediate_size;        /* F */
    int num_hidden_layers;        /* L */
    int num_attention_heads;      /* H */
    int num_key_value_heads;      /* K */
    int head_dim;                 /* D */
    int vocab_size;               /* V */
    int max_position_embeddings;
    float rms_norm_eps;
    double rope_theta;
    int rope_llama3;              /* rope_scaling.rope_type == "llama3" */
    double rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_position_embeddings;
    int tie_word_embeddings;
    int bos_token_id;             /* -1 when absent */
    int eos_token_ids[8];         /* eos_token_id (an int or a list) */
    int n_eos_token_ids;
    char torch_dtype[16];
} MbConfig;

/* Reads a Hugging Face LlamaConfig config.json. */
MbStatus mb_config_load(const char *path, MbConfig *cfg);

typedef struct MbModel MbModel;
typedef struct MbKVCache MbKVCache;

typedef struct {
    int threads;                  /* CPU threads for the ops; 0 = all online cores */
    int load_in_4bit;             /* quantize the 7 linear projections of each layer to NF4 while
                                     loading, as bitsandbytes does (nf4, blocksize 64, double quant
                                     with nested blocksize 256); embeddings, norms and lm_head keep
                                     their dtype. Checkpoints saved 4-bit by bitsandbytes load as
                                     NF4 without it. */
    const char *bnb_4bit_compute_dtype; /* "float32", "bfloat16" or "float16": the dtype 4-bit weights
                                     are dequantized to (the CPU computes in fp32 either way); NULL:
                                     the checkpoint's quantization_config, else "float32" */
} MbLoadOptions;

/* Loads a Hugging Face model folder (config.json + *.safetensors). Weights stay mapped in
 * their file dtype and are converted on the fly, a tile at a time; NF4 weights (load_in_4bit, or
 * a checkpoint saved by bitsandbytes) are held as 0.5 byte per value plus their absmax. */
MbStatus mb_model_load(const char *dir, const MbLoadOptions *opt, MbModel **out);
void mb_model_free(MbModel *m);
const MbConfig *mb_model_config(const MbModel *m);

/* A KV cache for B sequences of up to S tokens. */
MbStatus mb_kvcache_new(MbModel *m, int B, int S, MbKVCache **out);
void mb_kvcache_free(MbKVCache *c);
int mb_kvcache_len(const MbKVCache *c);   /* tokens already in the cache (same for all B) */
void mb_kvcache_reset(MbKVCache *c);

/* Runs tokens (B, T) through the model at positions cache_len .. cache_len+T-1 and appends
 * their keys/values to the cache (cache NULL: a fresh one, positions 0..T-1).
 * lens (B): for a right-padded prefill, the number of real tokens of each sequence (keys at or
 * beyond it are masked); NULL = all T are real. logits: (B, T, V) fp32, or (B, V) for the
 * last position only when last_only is set; NULL to skip the lm_head. */
MbStatus mb_model_forward(MbModel *m, MbKVCache *cache, const int32_t *tokens, int B, int T,
                          const int *lens, float *logits, int last_only);

/* Writes DIR/config.json (a copy of cfg_path) and DIR/model.safetensors with random weights
 * drawn as transformers initialises a Llama: normal(0, std) for linear and embedding weights,
 * ones for norms. dtype: MB_DT_BF16, MB_DT_F16 or MB_DT_F32. */
MbStatus mb_model_init_random(const char *cfg_path, const char *dir, uint64_t seed, MbDtype dtype,
                              double std);

#ifdef __cplusplus
}
#endif
#endif /* MEDBOT_H */
