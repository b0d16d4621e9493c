// The thin per-fork layer: every call whose name, signature or struct differs between llama.cpp
// forks goes through here. engine.cpp and bindings.cpp are fork-neutral.
// One implementation per fork: compat/upstream.cpp (llama.cpp, turboquant), compat/ik.cpp (ik_llama.cpp).
#pragma once

#include "engine_api.hpp"
#include "ggml.h"

struct llama_batch;

namespace PYLOCALAI_ENGINE_NS {
namespace compat {

// The log callback each fork gets (engine.cpp): warnings and errors to stderr, and error lines kept
// per thread so that a failed load can say why.
void engine_log(ggml_log_level level, const char * text, void * user_data);
// This thread's error lines logged since the last call with clear=true.
std::vector<std::string> engine_log_errors(bool clear);

// Once per process; throws EngineError when this CPU cannot run the build (ik_llama.cpp needs AVX2).
void backend_init();
std::vector<std::string> backend_names();
std::vector<std::string> cache_type_names();  // KV cache types new_context accepts

// nullptr when the fork refuses the file; engine.cpp then reports the fork's own error line.
llama_model * load_model(const ModelParams & params);
void free_model(llama_model * model);
// The fields whose calls differ between forks (engine.cpp reads the rest: EOG tokens, template, metadata).
void fill_model_info(llama_model * model, ModelInfo & info);

// trace (may be null) sees every graph node before it is computed (llama.cpp's cb_eval).
using TraceFn = bool (*)(struct ggml_tensor * t, bool ask, void * user_data);
llama_context * new_context(llama_model * model, const ContextParams & params, TraceFn trace, void * trace_data);
// Positions one sequence may use: the whole context when sequences share the cache (kv_unified).
uint32_t n_ctx_seq(llama_context * ctx, const ContextParams & params);
uint32_t n_seq_max(llama_context * ctx, const ContextParams & params);

// One call each, llama.cpp's convention: the count written, or minus the size needed when `n` is too small.
int32_t tokenize(const llama_vocab * vocab, const std::string & text, int32_t * out, int32_t n, bool add_special,
                 bool parse_special);
int32_t token_to_piece(const llama_vocab * vocab, int32_t token, char * buf, int32_t n, bool special);

// Memory (KV cache or recurrent state) of one sequence.
bool seq_rm(llama_context * ctx, int32_t seq, int32_t p0, int32_t p1);
void seq_cp(llama_context * ctx, int32_t src, int32_t dst, int32_t p0, int32_t p1);
void seq_keep(llama_context * ctx, int32_t seq);
void seq_add(llama_context * ctx, int32_t seq, int32_t p0, int32_t p1, int32_t delta);
int32_t seq_pos_max(llama_context * ctx, int32_t seq);
int32_t seq_pos_min(llama_context * ctx, int32_t seq);  // -1 for an empty sequence
// How far back a sliding-window layer attends (0: no such layers, or the fork keeps their whole
// context). Cached positions older than the window are dropped from those layers.
int32_t n_swa(const llama_model * model);
// The state of one sequence's memory, to restore later instead of recomputing its tokens: all of it,
// or (partial) only what cannot be cut back to a shorter prefix (the sliding-window cache, recurrent
// state). checkpoints_supported() is false where the fork cannot save that part alone.
bool checkpoints_supported();
std::vector<uint8_t> checkpoint_save(llama_context * ctx, int32_t seq, bool partial);
bool checkpoint_load(llama_context * ctx, int32_t seq, const uint8_t * data, size_t size, bool partial);
void memory_clear(llama_context * ctx);
bool can_shift(llama_context * ctx);
// Decodes that reused the previous step's compute graph instead of building one; -1 where the fork does not count.
int32_t graphs_reused(llama_context * ctx);

ChatPrompt chat_apply(llama_model * model, const ChatOptions & opts);
std::string chat_parse(const std::string & text, const ChatParseOptions & opts);
std::string json_schema_to_gbnf(const std::string & schema_json);

}  // namespace compat

// Sampling for one sequence: the fork's sampler stack with grammar, penalties and logit bias.
class SeqSampler {
public:
    SeqSampler(llama_model * model, const SamplingParams & params, const std::vector<int32_t> & history);
    ~SeqSampler();
    SeqSampler(const SeqSampler &) = delete;
    SeqSampler & operator=(const SeqSampler &) = delete;

    // Sample from the logits row `idx` of the last decode and accept the token into the state.
    int32_t sample_and_accept(llama_context * ctx, int32_t idx);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace PYLOCALAI_ENGINE_NS
