/* medbot.h: public API of medbot, a single-file C99 engine that trains (LoRA + DPO) and serves
 * a Llama-3.1 medical chatbot. The engine is medbot.c; this header is what a vendoring user
 * includes. Everything is plain C99: opaque handles, plain config structs, integer error codes.
 *
 * Table of contents (sections of medbot.c, in data-flow order)
 *   1. platform     errors, checked alloc/IO, mmap, thread pool, timers, JSON, key: value files, RNG,
 *                   SHA-256
 *   2. files        safetensors read (mmap, sharded) and write (streamed, sharded as save_pretrained),
 *                   config.json, dtype conversion
 *   3. tokenizer    Llama 3 byte-level BPE, specials, streaming UTF-8 decode
 *   4. weights      linear weights as f32/f16/bf16 or NF4 (bitsandbytes 4-bit, double quant)
 *   5. ops (CPU)    the op table MbOps: matmul, rmsnorm, rope, attention, swiglu, ...
 *   6. model        Llama-3.1 forward (prefill, decode with KV cache) and backward, written against
 *                   MbOps; the activation layout and the memory plan of `info --plan`
 *   7. lora         PEFT LoRA adapters on any of q/k/v/o/gate/up/down: new, load, save, enable, merge
 *   8. data         JSONL preference pairs, the card's template, TRL's tokenization and truncation
 *   9. dpo          the DPO (and SFT) trainer: losses, TRL's metrics, AdamW, schedules, checkpoints
 *  10. sampler      HF generate's logits processors, greedy / seeded sampling, stop ids, streaming;
 *                   the chat session (MbChat) in the card's format
 *  11. coordinator  collectives (threads, TCP, NCCL), the rendezvous, the job fingerprint
 *  12. cuda         the op table on NVIDIA GPUs (driver, NVRTC, cuBLASLt, NCCL loaded at run time)
 *  13. cli          medbot info | init | ...; main() behind #ifndef MEDBOT_NO_MAIN
 *
 * Conventions: every function that can fail returns an MbStatus (MB_OK == 0) and leaves a
 * one-line message in mb_last_error() that names the file and the problem. The library never
 * ends its host process (no exit or abort outside main: the CLI prints the message and main
 * returns 1): running out of memory is MB_ERR_OOM ("out of memory allocating N bytes at FILE:LINE"),
 * a GPU failure MB_ERR_DEVICE (a backend that failed inside an op does nothing more but free, and
 * the next call that can return a status returns it), and a data-parallel rank that dies or hangs
 * fails the collectives of the job, so mb_train returns that. stb_ds's growth of small arrays
 * (realloc inside arrput) is the one allocation that cannot report a failure.
 * Counts and byte offsets are size_t. Shapes use the legend at the top of medbot.c.
 */
#ifndef MEDBOT_H
#define MEDBOT_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

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
    MB_ERR_DEVICE,      /* GPU, driver or NCCL failure */
    MB_INTERRUPTED      /* stopped on request (MbTrainJob.interrupt), state saved where it could be */
} MbStatus;

/* The message of the last failure on this thread: one line, "FILE: problem [--> hint]". */
const char *mb_last_error(void);

/* ---------- progress of long work and log lines (section 1) ---------- */

/* Work that can take more than a moment (loading and quantizing a model, random weights, writing
 * one, reference log-probs, training) reports through the MbProgress its options carry; a NULL fn
 * is silent. Events of one task come from one thread, in order: BEGIN, any number of STEP (at most
 * about ten a second), END. */
typedef enum { MB_PROGRESS_BEGIN, MB_PROGRESS_STEP, MB_PROGRESS_END } MbProgressState;

typedef struct {
    MbProgressState state;
    const char *task;     /* what is being done, e.g. "loading weights/tiny (NF4)" */
    const char *unit;     /* "bytes" (shown as MB, GB), or a noun: "tensors", "steps", "pairs" */
    double done, total;   /* total <= 0: unknown */
    double start;         /* done at BEGIN (a resumed run's steps): rates count from it */
    double seconds;       /* since BEGIN */
    const char *note;     /* NULL, or a short text shown after the figures ("loss 0.41 acc 0.88") */
    int ok;               /* END: 1 when the task finished, 0 when it failed or stopped */
} MbProgressEvent;

typedef void (*MbProgressFn)(void *ctx, const MbProgressEvent *ev);
typedef struct {
    MbProgressFn fn;
    void *ctx;
} MbProgress;

/* The command line's printer: when stderr is a terminal, a bar there with done of total, rate
 * and time left, redrawn at most ten times a second; when the task ends, one line ("loading
 * weights/tiny: 33.5 MB in 0.4 s, 84 MB/s"). When stderr is not a terminal, no bar: the end
 * line, and a line every 30 s of a long task. ctx: NULL prints the lines on stdout, for tasks of
 * a second or more; an MbProgressLines sends them to `out` and leaves out tasks shorter than
 * min_seconds (generate and chat: stderr, so that stdout holds the answers alone). */
typedef struct {
    FILE *out;
    double min_seconds;
    int lines_only;       /* 1: no bar even on a terminal */
} MbProgressLines;
void mb_progress_print(void *ctx, const MbProgressEvent *ev);

/* A log line on stdout, flushed, after taking a bar of mb_progress_print off the terminal (the
 * bar is drawn again at its next step). Every line the library prints goes through it. */
void mb_say(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

/* ---------- key: value files (section 1) ---------- */

/* One setting of a --config file: the key, its value (a list comes as "a,b"), its 1-based line. */
typedef struct {
    char *key, *value;
    int line;
} MbKv;

/* Reads the flat YAML of training configs (TRL, PEFT, the card's block): top-level `key: value`
 * lines with plain or quoted scalars, lists as [a, b] or as `- item` lines below their key,
 * comments, a leading ---, a UTF-8 BOM. Anything else (nesting, anchors, tags, | and > scalars,
 * several documents, duplicate keys, tabs as indentation, UTF-16) fails with "NAME:LINE: problem".
 * *out holds *count entries in file order; free them with mb_kv_free. */
MbStatus mb_kv_parse(const char *name, const char *text, size_t n, MbKv **out, size_t *count);
MbStatus mb_kv_read(const char *path, MbKv **out, size_t *count);
void mb_kv_free(MbKv *kv, size_t count);

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

/* ---------- tokenizer ---------- */

/* Llama 3's byte-level BPE, loaded from a Hugging Face tokenizer.json or from Meta's
 * tokenizer.model (tiktoken format; the 256 Llama 3.1 special tokens follow its last rank).
 * Both give the same ids as `tokenizers` and tiktoken. A loaded tokenizer is read-only: any
 * number of threads may encode and decode with it at once. */
typedef struct MbTokenizer MbTokenizer;

/* PATH: a tokenizer.json, a tokenizer.model, or a folder holding either (tokenizer.json is
 * preferred when both are there). */
MbStatus mb_tokenizer_load(const char *path, MbTokenizer **out);
void mb_tokenizer_free(MbTokenizer *tok);
/* Applies a Hugging Face tokenizer_config.json: bos_token, eos_token (a string or an AddedToken
 * object; null: none) and add_bos_token. mb_tokenizer_load applies the one beside the tokenizer
 * file (or in its folder) by itself; call this for another one (the model folder's). */
MbStatus mb_tokenizer_load_config(MbTokenizer *tok, const char *path);
/* The tokenizer of a command, found as transformers/TRL find it: `tokenizer` (a file or folder)
 * when not NULL, else MODEL_DIR's, else LORA_DIR's (may be NULL; a trainer saves the tokenizer with
 * its adapter); with the tokenizer_config.json beside it, else MODEL_DIR's. */
MbStatus mb_tokenizer_open(const char *tokenizer, const char *model_dir, const char *lora_dir, MbTokenizer **out);
/* The tokenizer_config.json applied, or NULL (then BOS/EOS are Llama 3's defaults). */
const char *mb_tokenizer_config_path(const MbTokenizer *tok);

size_t mb_tokenizer_vocab_size(const MbTokenizer *tok); /* V: largest id + 1 (128256) */
/* tokenizer_config.json's bos_token / eos_token; without one, <|begin_of_text|> (128000) and
 * <|end_of_text|> (128001); -1 if none. TRL appends this EOS to every completion. */
int32_t mb_tokenizer_bos_id(const MbTokenizer *tok);
int32_t mb_tokenizer_eos_id(const MbTokenizer *tok);
/* Whether tokenizer(text) puts <|begin_of_text|> in front, the default of generate's --add_bos: 1,
 * unless tokenizer_config.json names a Llama tokenizer class with add_bos_token false
 * (transformers' PreTrainedTokenizerFast, Llama 3's class, ignores add_bos_token). */
int mb_tokenizer_add_bos(const MbTokenizer *tok);
/* The id of the token whose text is exactly `text` (a special token such as "<|eot_id|>", or
 * any vocabulary entry), or -1. */
int32_t mb_tokenizer_token_id(const MbTokenizer *tok, const char *text);
/* The bytes of token `id` (not NUL-terminated; a special token's bytes are its text), or NULL
 * when no token has that id. */
const char *mb_tokenizer_token_bytes(const MbTokenizer *tok, int32_t id, size_t *len);
int mb_tokenizer_is_special(const MbTokenizer *tok, int32_t id);

/* Flags of mb_tokenizer_encode. By default text that spells a special or added token
 * ("<|eot_id|>") becomes that token, as in Hugging Face and tiktoken with allowed_special="all". */
enum {
    MB_ENCODE_ADD_BOS = 1,          /* add the template's special tokens (HF add_special_tokens=True):
                                       for Llama 3, <|begin_of_text|> in front */
    MB_ENCODE_SPECIALS_AS_TEXT = 2  /* encode "<|eot_id|>" as ordinary text (tiktoken
                                       encode_ordinary, HF split_special_tokens=True); use it for
                                       untrusted user text */
};

/* Encodes len bytes of text. Any bytes are accepted: each byte that is not part of valid UTF-8
 * becomes its own single-byte token. *ids is malloc'd (free() it); *n its count. */
MbStatus mb_tokenizer_encode(const MbTokenizer *tok, const char *text, size_t len, unsigned flags,
                             int32_t **ids, size_t *n);

/* Decodes ids to text (malloc'd, NUL-terminated, *len bytes). Bytes that do not form valid
 * UTF-8 become U+FFFD, one per maximal invalid subsequence (as Python's errors="replace" and
 * Rust's from_utf8_lossy). skip_special_tokens drops special tokens (HF's flag). An id that
 * names no token is an error. */
MbStatus mb_tokenizer_decode(const MbTokenizer *tok, const int32_t *ids, size_t n,
                             int skip_special_tokens, char **text, size_t *len);

/* Streaming decode for generation: feed ids one at a time; each call returns the text that is
 * now complete. A UTF-8 character split across tokens is held back until its last byte arrives,
 * so the output never ends in a broken character; the pieces joined equal mb_tokenizer_decode.
 * Fields are private. */
typedef struct {
    const MbTokenizer *tok;
    int skip_special_tokens;
    unsigned char held[4];  /* the start of a character still waiting for its last bytes */
    size_t n_held;
    char *buf;              /* the text of the last call */
    size_t cap;
} MbTokenStream;

void mb_token_stream_init(MbTokenStream *s, const MbTokenizer *tok, int skip_special_tokens);
/* *text points into s and stays valid until the next call on s. */
MbStatus mb_token_stream_put(MbTokenStream *s, int32_t id, const char **text, size_t *len);
/* End of stream: a character still held back (it never completed) comes out as U+FFFD. */
MbStatus mb_token_stream_finish(MbTokenStream *s, const char **text, size_t *len);
void mb_token_stream_free(MbTokenStream *s);

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
typedef struct MbLora MbLora;

/* Where a model runs. AUTO: CUDA when the NVIDIA driver sees a GPU (the environment variable
 * MEDBOT_DEVICE=cpu|cuda overrides it), else the CPU; an automatic CUDA that cannot start (no
 * NVRTC, an unsupported head_dim) falls back to the CPU with a note. */
typedef enum { MB_DEVICE_AUTO, MB_DEVICE_CPU, MB_DEVICE_CUDA } MbDevice;

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
    int device;                   /* MbDevice */
    int gpu;                      /* CUDA device ordinal (0: the first visible GPU) */
    int random_init;              /* read config.json only: every weight is drawn from `seed` on the
                                     device (normal(0, 0.02) bf16; with load_in_4bit the projections are
                                     random NF4 codes with double-quant state). For speed and memory
                                     measurements at real shapes without the real weights. */
    uint64_t seed;
    MbProgress progress;          /* reading, checking and quantizing the weights (none: silent) */
    int fast;                     /* inference (mb_model_forward, mb_generate) on the CPU through the
                                     fast path: NF4 weights against activations quantized to 8 bits
                                     with integer dot products, bf16 weights with bf16 products.
                                     Its logits differ from the exact path's (README: "The fast path"
                                     gives the measured KL divergence). 0: the exact path, whose
                                     numbers equal transformers' (what training, eval and the parity
                                     tests always use, whatever this says). The CLI's generate and
                                     chat set it unless --exact. */
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

/* What mb_model_init_random draws and how it writes it. */
typedef struct {
    uint64_t seed;
    MbDtype dtype;                    /* MB_DT_BF16, MB_DT_F16 or MB_DT_F32 */
    double std;                       /* normal(0, std) (> 0; transformers' initializer_range is 0.02) */
    size_t max_shard_size;            /* bytes per file, save_pretrained's max_shard_size; 0: its default,
                                         5 GB (5 * 10^9) */
    volatile sig_atomic_t *interrupt; /* NULL, or a flag a signal handler sets: the folder is left as it
                                         was and MB_INTERRUPTED returned */
    MbProgress progress;              /* "writing random weights to DIR", in bytes (none: silent) */
} MbInitOptions;

/* Writes DIR/config.json (a copy of cfg_path) and the weights, random, drawn as transformers
 * initialises a Llama: normal(0, std) for linear and embedding weights, ones for norms, from one
 * seeded stream (the same values whatever the shards). The weights are written as save_pretrained
 * writes them: DIR/model.safetensors, or shards of at most max_shard_size (a bigger tensor gets
 * one of its own) named model-00001-of-0000N.safetensors with model.safetensors.index.json; a
 * tensor at a time, in pieces, so that memory stays small for any model. Every file is written as
 * a temporary and renamed once all are complete: a failure (a full disk, an interrupt) leaves no
 * file and no folder it made, and an earlier model in DIR as it was; a success removes the earlier
 * model's weights that the new ones do not replace. */
MbStatus mb_model_init_random(const char *cfg_path, const char *dir, const MbInitOptions *opt);

/* The memory plan of `medbot info --plan`: the bytes per device of one DPO training step on the
 * CUDA backend (bf16 activations, fp32 trainable state, the base in NF4 or bf16), from the config
 * alone, counted with the activation layout the model allocates. A batch of `batch` pairs runs
 * N = 2 batch max_length tokens. */
typedef struct {
    int load_in_4bit, lora_r, batch, max_length, gradient_checkpointing, gpus, zero_stage;
    double lora_alpha;
    unsigned targets;             /* bit i: projection i carries a LoRA adapter (MbLoraConfig.targets) */
} MbPlanOptions;

enum { MB_PLAN_QUANT, MB_PLAN_ABSMAX, MB_PLAN_BF16, MB_PLAN_LORA, MB_PLAN_GRADS, MB_PLAN_GRADSUM, MB_PLAN_ADAM,
       MB_PLAN_ACTS, MB_PLAN_LOGITS, MB_PLAN_WORKSPACE, MB_PLAN_ROWS };

typedef struct {
    size_t bytes[MB_PLAN_ROWS];   /* per kind of buffer */
    const char *kind[MB_PLAN_ROWS]; /* its name ("activations") */
    char how[MB_PLAN_ROWS][200];  /* how its bytes were counted */
    size_t trainable;             /* LoRA parameters */
    size_t full_logits;           /* bytes of the batch's (N, V) fp32 logits, which the fused lm_head never holds */
} MbPlan;

MbStatus mb_plan_compute(const MbConfig *c, const MbPlanOptions *o, MbPlan *p); /* MB_ERR_OOM only */

/* ---------- lora ---------- */

typedef struct {
    int r;                /* rank R */
    double alpha;         /* lora_alpha: scale = alpha / r (alpha / sqrt(r) with use_rslora) */
    double dropout;       /* lora_dropout (training only) */
    int use_rslora;
    unsigned targets;     /* bit i set: projection i adapted (q, k, v, o, gate, up, down = 1..7) */
} MbLoraConfig;

/* A new adapter initialised as PEFT does (A kaiming-uniform from seed, B zero). */
MbStatus mb_lora_new(const MbModel *m, const MbLoraConfig *cfg, uint64_t seed, MbLora **out);
/* A PEFT adapter folder (adapter_config.json + adapter_model.safetensors, fp32/bf16/f16). */
MbStatus mb_lora_load(const MbModel *m, const char *dir, MbLora **out);
/* Writes a PEFT adapter folder that PeftModel.from_pretrained loads (weights fp32). */
MbStatus mb_lora_save(const MbLora *lo, const char *dir, const char *base_model);
void mb_lora_free(MbLora *lo);
size_t mb_lora_num_params(const MbLora *lo);
/* Attaches lo to m (NULL detaches); the model uses it when enabled (the reference policy of
 * DPO is the model with the adapter disabled). m does not own lo. */
void mb_model_set_lora(MbModel *m, MbLora *lo);
void mb_lora_set_enabled(MbLora *lo, int enabled);
/* Writes OUT/model.safetensors (bf16; adapter merged in fp32: W + scale B A), OUT/config.json
 * (the base's, dtype bfloat16, no quantization_config) and the base's generation_config.json.
 * OUT is made with its parents. */
MbStatus mb_model_merge_save(const MbModel *m, const MbLora *lo, const char *model_dir, const char *out_dir);
/* The whole merge command: loads MODEL_DIR and the adapter, writes OUT (made with its parents)
 * as mb_model_merge_save plus the tokenizer files (tokenizer, a path, else the model's, else the
 * adapter's), so that OUT loads in transformers and in medbot as a model folder. Refuses an OUT
 * that would write over an input; a failure leaves nothing it wrote. threads: 0 = all cores;
 * progress (NULL: silent): loading the base. */
MbStatus mb_merge(const char *model_dir, const char *lora_dir, const char *tokenizer, const char *out_dir,
                  int threads, const MbProgress *progress);

/* ---------- training (DPO, SFT) ---------- */

/* Every setting of a run, named as TRL's DPOConfig / transformers' TrainingArguments. */
typedef struct {
    MbLoraConfig lora;
    int loss_type;                  /* 0 sigmoid, 1 hinge, 2 ipo, 3 robust */
    double beta, label_smoothing;
    double learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon, max_grad_norm;
    int lr_scheduler_type;          /* 0 linear, 1 cosine, 2 constant, 3 constant_with_warmup */
    double warmup_ratio;
    int warmup_steps;               /* > 0 overrides warmup_ratio */
    int per_device_train_batch_size, per_device_eval_batch_size, gradient_accumulation_steps;
    double num_train_epochs;
    int max_steps;                  /* > 0 overrides num_train_epochs */
    int max_length, max_prompt_length, max_completion_length; /* <= 0: no limit */
    int add_bos;                    /* prepend <|begin_of_text|> to prompts (TRL does not) */
    int gradient_checkpointing, precompute_ref_log_probs;
    int shuffle;                    /* shuffle the pairs each epoch (seeded); 0: file order */
    int seed, logging_steps, save_steps, eval_steps;
    double eval_split;              /* hold out this share of the data when no eval file is given */
} MbTrainConfig;

void mb_train_config_defaults(MbTrainConfig *c);

typedef struct {
    const char *model_dir;          /* Hugging Face model folder */
    const char *tokenizer_path;     /* NULL: the model folder's tokenizer */
    const char *data_path;          /* JSONL preference pairs */
    const char *eval_data_path;     /* NULL: eval_split of data_path (or no evaluation) */
    const char *output_dir;         /* adapter, checkpoint-N/, metrics.jsonl, training.svg */
    const char *lora_init;          /* NULL: a new adapter (cfg.lora); else a PEFT adapter to start from */
    const char *resume;             /* a checkpoint folder, "latest", or NULL */
    int sft;                        /* 1: next-token loss on the chosen completion (SFT) */
    int threads;                    /* CPU threads in all, 0 = all cores */
    int nproc;                      /* data-parallel ranks in this process (CPU: threads), >= 1 */
    int load_in_4bit;               /* QLoRA: the base's projections in NF4 (see MbLoadOptions) */
    const char *bnb_4bit_compute_dtype; /* NULL, "float32", "bfloat16" or "float16" */
    int zero_stage;                 /* -1: 1 with several ranks, else 0; 1: AdamW moments sharded */
    int device;                     /* MbDevice; with CUDA, --nproc N drives GPUs gpu .. gpu + N - 1 */
    int gpu;                        /* the CUDA device of this process's first rank (torchrun: LOCAL_RANK) */
    int random_init;                /* random weights (MbLoadOptions.random_init), seeded by cfg.seed */
    /* a launcher (torchrun, SLURM, MPI: the CLI reads their variables): world_size > 1 makes this
     * process rank `rank` of a job joined by a TCP rendezvous at master_addr:master_port, where the
     * ranks' job fingerprints must agree (mb_rendezvous); then through NCCL on the CUDA backend (one
     * GPU per process), through the rendezvous connections on the CPU */
    int world_size, rank, master_port;
    const char *master_addr;
    double ddp_timeout;             /* seconds a rank waits for the others, then the job stops; 0 = 1800 */
    int overwrite_output_dir;       /* an output_dir that holds a run: replace it (else refused unless resuming) */
    /* NULL, or a flag a signal handler sets (SIGINT): the run abandons the optimizer step in
     * progress, writes a checkpoint of the last finished one and returns MB_INTERRUPTED */
    volatile sig_atomic_t *interrupt;
    MbProgress progress;            /* loading, reference log-probs, the steps (none: silent) */
    MbTrainConfig cfg;
} MbTrainJob;

/* Trains a LoRA adapter with DPO (or SFT) as TRL's DPOTrainer does and saves it (PEFT format,
 * with the tokenizer files) in output_dir, with checkpoints every cfg.save_steps. output_dir is
 * made with its parents once the model and data have loaded; it may not be an input (or hold one
 * where the run writes), and may not hold another run unless overwrite_output_dir or resume is
 * set. Resuming removes stale temporary files of killed runs and cuts metrics.jsonl back to the
 * checkpoint's step. A run that fails before its first checkpoint leaves nothing it created. */
MbStatus mb_train(const MbTrainJob *job);
/* Prints TRL's eval_ metrics of the model + adapter (lora_init) on data_path. */
MbStatus mb_evaluate(const MbTrainJob *job);

/* ---------- sampler ---------- */

/* Generation settings, named as transformers' GenerationConfig. */
#define MB_MAX_STOP_IDS 16
typedef struct {
    int max_new_tokens;           /* 256 */
    int do_sample;                /* 1: draw from softmax; 0: greedy (the first argmax) */
    double temperature;           /* 0.7 (sampling only; 1 = off) */
    int top_k;                    /* 50, transformers' default (sampling only; 0 = off) */
    double top_p;                 /* 0.9 (sampling only; 1 = off) */
    double repetition_penalty;    /* 1.1 (1 = off) */
    int no_repeat_ngram_size;     /* 0 = off (the card's conservative setting: 3) */
    int min_tokens_to_keep;       /* 1 */
    uint64_t seed;                /* sampling draws from medbot's RNG: the same seed gives the same
                                     tokens on every run (not torch.multinomial's stream) */
    int32_t stop_ids[MB_MAX_STOP_IDS]; /* generation ends after any of these (it is the last output) */
    int n_stop_ids;
} MbGenerationConfig;

/* The card's sampling: max_new_tokens 256, do_sample, temperature 0.7, top_k 50, top_p 0.9,
 * repetition_penalty 1.1, no stop ids, seed 0. */
void mb_generation_config_defaults(MbGenerationConfig *g);
/* Sets the stop ids as generate does for a Llama-3.1 checkpoint: eos_token_id of
 * MODEL_DIR/generation_config.json when that file exists, else of config.json; plus <|eot_id|>
 * and <|eom_id|> when the tokenizer has them (model_dir and tok may be NULL). */
MbStatus mb_generation_set_stop_ids(MbGenerationConfig *g, const char *model_dir, const MbModel *m,
                                    const MbTokenizer *tok);
int mb_generation_is_stop(const MbGenerationConfig *g, int32_t id);

/* Logits processors and the token choice of transformers' generate, with scratch for V logits. */
typedef struct MbSampler MbSampler;
MbStatus mb_sampler_new(const MbGenerationConfig *g, size_t V, MbSampler **out);
void mb_sampler_free(MbSampler *s);
/* Applies, in place, the processors generate applies in its order: repetition_penalty,
 * no_repeat_ngram_size, then when sampling temperature, top_k, top_p. logits (V) of the next
 * position; ids (n) the sequence so far, prompt included. */
void mb_sampler_process(MbSampler *s, float *logits, const int32_t *ids, size_t n);
/* mb_sampler_process, then the next token: the first argmax, or a draw from the softmax. */
MbStatus mb_sampler_next(MbSampler *s, float *logits, const int32_t *ids, size_t n, int32_t *token);

/* Called for each new token with the text it completes (UTF-8, never a broken character;
 * special tokens give no text), and once more with id -1 for text still held at the end.
 * Return non-zero to stop generating. */
typedef int (*MbTokenCallback)(void *ctx, int32_t id, const char *text, size_t len);

/* Generates after ids (n): the whole sequence so far, of which kv (B = 1) already holds the first
 * mb_kvcache_len(kv) tokens (fewer than n). Writes up to max_new_tokens ids to out (the last is
 * a stop id when one ended it) and their count to *n_out; stops early when kv is full (it then
 * holds n + *n_out - 1 tokens: the last new id is never run). tok: NULL for ids only. */
MbStatus mb_generate(MbModel *m, MbKVCache *kv, MbSampler *s, const MbTokenizer *tok, const int32_t *ids,
                     size_t n, int32_t *out, size_t *n_out, MbTokenCallback cb, void *ctx);

/* ---------- chat (section 10) ---------- */

/* A model with its adapter, tokenizer and sampler, answering in the card's format
 * "###System: {system}\n###Question: {question}\n###Answer: ": one prompt at a time
 * (mb_chat_generate) or as a conversation kept in a KV cache (mb_chat_turn). One thread at a time. */
typedef struct MbChat MbChat;

typedef struct {
    const char *model;            /* Hugging Face model folder (required) */
    const char *tokenizer;        /* NULL: found as mb_tokenizer_open finds it (the model's, else the adapter's) */
    const char *lora;             /* a PEFT adapter folder, or NULL */
    const char *system;           /* the template's system text; NULL: the card's */
    MbLoadOptions load;           /* how the model loads (threads, 4-bit, device) */
    int add_bos;                  /* <|begin_of_text|> in front of a prompt; -1: the tokenizer's default
                                     (mb_tokenizer_add_bos) */
    int max_context;              /* the most tokens the model runs at once; 0: max_position_embeddings,
                                     at most 4096 */
    MbGenerationConfig gen;       /* the sampling; its stop ids are set as mb_generation_set_stop_ids does */
    const char *name;             /* starts the messages of the session's own checks ("generate"); NULL: "chat" */
} MbChatOptions;

typedef enum {
    MB_CHAT_ANSWERED,             /* the answer was generated */
    MB_CHAT_FULL,                 /* mb_chat_turn: the conversation, this question and room for max_new_tokens
                                     exceed the context; nothing was done (mb_chat_reset, then ask again) */
    MB_CHAT_TOO_LONG              /* the prompt alone fills the context: not answered */
} MbChatOutcome;

/* What became of one prompt. */
typedef struct {
    MbChatOutcome outcome;
    size_t prompt_tokens;         /* the ids of this prompt (template and <|begin_of_text|> included) */
    size_t history_tokens;        /* mb_chat_turn: the ids of the conversation before it */
    size_t n_tokens;              /* new ids generated (the stop id that ended the answer included) */
    int stopped;                  /* the answer ended with a stop id */
    int cut;                      /* the answer ended at the context limit, before max_new_tokens */
} MbChatReply;

MbStatus mb_chat_open(const MbChatOptions *o, MbChat **out);
void mb_chat_close(MbChat *ch);
int mb_chat_context(const MbChat *ch);    /* the context in tokens (max_context) */
/* Answers one prompt outside the conversation: the template around text with system (NULL: the
 * session's), or (raw) the text as it is, special tokens in it parsed. The answer's text streams to
 * cb (MbTokenCallback: non-zero stops it). */
MbStatus mb_chat_generate(MbChat *ch, const char *text, const char *system, int raw, MbTokenCallback cb, void *ctx,
                          MbChatReply *r);
/* Asks the next question of the conversation: the first is the template (with <|begin_of_text|> when
 * add_bos), each later one continues it with "\n###Question: {question}\n###Answer: ". The question is
 * encoded as text (a typed "<|eot_id|>" stays text); the answer streams to cb and joins the
 * conversation, which the KV cache holds, so a turn runs only its new tokens. A turn that fails
 * while generating ends the conversation; one that fails before (encoding) leaves it as it was. */
MbStatus mb_chat_turn(MbChat *ch, const char *question, MbTokenCallback cb, void *ctx, MbChatReply *r);
/* Starts a new conversation. The first call (or the first turn) makes the conversation's KV cache
 * of max_context tokens: call it after mb_chat_open to learn early that it does not fit. */
MbStatus mb_chat_reset(MbChat *ch);

/* ---------- coordinator (section 11) ---------- */

/* What the ranks of a job must share, compared at the rendezvous: SHA-256 digests of the model
 * files, the tokenizer, the training data (data_path and eval_data_path) and the options that
 * change the math, plus those options as text ("name=value" lines, a fixed order) so that a
 * difference can be named. A digest of zeros means "not read" and matches only another one. */
typedef struct {
    uint8_t model[32], tokenizer[32], data[32], options[32];
    char options_text[4096];
} MbJobFingerprint;

/* The fingerprint of a job, from the files' bytes (never their dates: each rank may read its own
 * copy). Data and tokenizer files (with the tokenizer's tokenizer_config.json) are hashed whole;
 * a model is its config.json plus, for each safetensors file, its size, its header and 64 blocks
 * of 4 KiB spread over its data (milliseconds for an 8B checkpoint); a random_init model is its
 * config.json and seed; a lora_init adapter is hashed like a model, into the options. A file that
 * cannot be read leaves its part zero and is the error returned (fp is filled either way). */
MbStatus mb_job_fingerprint(const MbTrainJob *job, MbJobFingerprint *fp);

/* The rendezvous of a multi-process job: every rank calls it with MASTER_ADDR/MASTER_PORT; rank 0
 * listens there and rank 0's blob (n bytes) reaches every other rank. Rank 0 serves the joins
 * concurrently: a connection that sends nothing valid within 10 s is dropped without delaying the
 * others. fp: this rank's job fingerprint (NULL: none, which matches only none); a rank whose
 * fingerprint, WORLD_SIZE or RANK does not fit is refused and the job stops with a message naming
 * what differs, on rank 0 and on the rank. When the environment variable MEDBOT_RDV_SECRET is set,
 * each side proves it knows the secret (HMAC-SHA256 over fresh nonces; the secret is never sent):
 * a connection that cannot prove it is turned away and rank 0 keeps waiting for the real rank; a
 * secret set on one side only, or different secrets, fail with a message naming the variable. A
 * rank missing after timeout seconds is an error naming it. */
MbStatus mb_rendezvous(const char *addr, int port, int rank, int world, const MbJobFingerprint *fp, void *blob,
                       size_t n, double timeout);

#ifdef __cplusplus
}
#endif
#endif /* MEDBOT_H */
