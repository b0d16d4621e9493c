// Fork-neutral engine: Model and Session over the compat layer.
#include "engine_api.hpp"

#include "compat/compat.hpp"
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <numeric>

namespace PYLOCALAI_ENGINE_NS {

namespace {
thread_local std::vector<std::string> t_log_errors;  // this thread's error lines since its last load began
}

void compat::engine_log(ggml_log_level level, const char * text, void * /*user*/) {
    // The forks log every tensor at load; keep warnings and errors only.
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
    if (level == GGML_LOG_LEVEL_ERROR && t_log_errors.size() < 64) {
        t_log_errors.emplace_back(text);
    }
}

std::vector<std::string> compat::engine_log_errors(bool clear) {
    std::vector<std::string> out = t_log_errors;
    if (clear) {
        t_log_errors.clear();
    }
    return out;
}

// ---------------------------------------------------------------- Model

Model::Model(const ModelParams & params) {
    t_log_errors.clear();
    model_ = compat::load_model(params);
    if (model_ == nullptr) {
        // llama.cpp and ik both log "llama_model_load: error loading model: <why>" before failing
        std::string why = "not a GGUF this engine can read?";
        const std::string marker = "error loading model: ";
        for (const auto & line : t_log_errors) {
            const auto at = line.find(marker);
            if (at != std::string::npos) {
                why = line.substr(at + marker.size());
                while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) {
                    why.pop_back();
                }
                break;
            }
        }
        throw EngineError("failed to load model from '" + params.path + "': " + why);
    }
    vocab_ = llama_model_get_vocab(model_);
    compat::fill_model_info(model_, info_);
    // The rest reads the same in every fork.
    for (int32_t t = 0; t < info_.n_vocab; ++t) {
        if (llama_vocab_is_eog(vocab_, t)) {
            info_.eog_tokens.push_back(t);
        }
    }
    if (const char * tmpl = llama_model_chat_template(model_, nullptr)) {
        info_.chat_template = tmpl;
    }
    info_.recurrent = llama_model_is_recurrent(model_);
    info_.hybrid = llama_model_is_hybrid(model_);
    info_.has_encoder = llama_model_has_encoder(model_);
    const int32_t n_meta = llama_model_meta_count(model_);
    std::vector<char> key(512);
    std::vector<char> val(1 << 16);
    for (int32_t i = 0; i < n_meta; ++i) {
        if (llama_model_meta_key_by_index(model_, i, key.data(), key.size()) < 0) {
            continue;
        }
        const int32_t n = llama_model_meta_val_str_by_index(model_, i, val.data(), val.size());
        if (n >= 0 && static_cast<size_t>(n) < val.size()) {
            info_.metadata[key.data()] = val.data();
        }
    }
}

Model::~Model() {
    if (model_ != nullptr) {
        compat::free_model(model_);
    }
}

std::vector<int32_t> Model::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    std::vector<int32_t> out(text.size() + 2);
    int32_t n = compat::tokenize(vocab_, text, out.data(), static_cast<int32_t>(out.size()), add_special, parse_special);
    if (n < 0) {  // more tokens than the guess: the call said how many
        out.resize(static_cast<size_t>(-n));
        n = compat::tokenize(vocab_, text, out.data(), static_cast<int32_t>(out.size()), add_special, parse_special);
    }
    if (n < 0) {
        throw EngineError("tokenization failed");
    }
    out.resize(static_cast<size_t>(n));
    return out;
}

std::string Model::token_to_piece(int32_t token, bool special) const {
    if (token < 0 || token >= info_.n_vocab) {
        throw std::invalid_argument("token id " + std::to_string(token) + " is outside the vocabulary");
    }
    return piece(token, special);
}

std::string Model::piece(int32_t token, bool special) const {
    char small[64];
    int32_t n = compat::token_to_piece(vocab_, token, small, sizeof(small), special);
    if (n >= 0) {
        return std::string(small, static_cast<size_t>(n));
    }
    std::string big(static_cast<size_t>(-n), '\0');
    n = compat::token_to_piece(vocab_, token, big.data(), static_cast<int32_t>(big.size()), special);
    big.resize(static_cast<size_t>(std::max(n, 0)));
    return big;
}

std::string Model::detokenize(const std::vector<int32_t> & tokens, bool remove_special, bool unparse_special) const {
    for (int32_t t : tokens) {
        if (t < 0 || t >= info_.n_vocab) {
            throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary");
        }
    }
    std::string out(tokens.size() * 8 + 16, '\0');
    int32_t n = llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                                 static_cast<int32_t>(out.size()), remove_special, unparse_special);
    if (n < 0) {
        out.resize(static_cast<size_t>(-n));
        n = llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                             static_cast<int32_t>(out.size()), remove_special, unparse_special);
    }
    out.resize(static_cast<size_t>(std::max(n, 0)));
    return out;
}

bool Model::is_eog(int32_t token) const { return llama_vocab_is_eog(vocab_, token); }

ChatPrompt Model::chat_apply(const ChatOptions & opts) const { return compat::chat_apply(model_, opts); }

std::string Model::chat_parse(const std::string & text, const ChatParseOptions & opts) const {
    return compat::chat_parse(text, opts);
}

std::string json_schema_to_gbnf(const std::string & schema_json) { return compat::json_schema_to_gbnf(schema_json); }

std::vector<std::string> cache_type_names() { return compat::cache_type_names(); }

// ---------------------------------------------------------------- Session

Session::Session(std::shared_ptr<Model> model, const ContextParams & params) : model_(std::move(model)) {
    ctx_ = compat::new_context(model_->raw(), params, params.trace_ops ? &Session::trace_op : nullptr, this);
    n_ctx_seq_ = compat::n_ctx_seq(ctx_, params);
    n_seq_max_ = compat::n_seq_max(ctx_, params);
}

Session::~Session() {
    samplers_.clear();
    if (ctx_ != nullptr) {
        llama_free(ctx_);
    }
}

uint32_t Session::n_ctx() const { return llama_n_ctx(ctx_); }

bool Session::trace_op(struct ggml_tensor * t, bool ask, void * self) {
    if (!ask) {
        return true;
    }
    std::string key = ggml_op_desc(t);
    if ((t->op == GGML_OP_MUL_MAT || t->op == GGML_OP_MUL_MAT_ID) && t->src[0] != nullptr) {
        key += ':';
        key += ggml_type_name(t->src[0]->type);
    }
    auto * session = static_cast<Session *>(self);
    std::lock_guard<std::mutex> lock(session->trace_mu_);
    ++session->op_counts_[key];
    for (const ggml_tensor * src : t->src) {
        if (src != nullptr && src->op == GGML_OP_NONE) {
            const std::string name = src->name;
            if (name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0) {
                session->weights_used_.insert(name);
            }
        }
    }
    return false;  // not asking for the data: the graph still runs in one piece
}

std::map<std::string, int64_t> Session::op_counts() const {
    std::lock_guard<std::mutex> lock(trace_mu_);
    return op_counts_;
}

std::set<std::string> Session::weights_used() const {
    std::lock_guard<std::mutex> lock(trace_mu_);
    return weights_used_;
}

void Session::reset_op_counts() {
    std::lock_guard<std::mutex> lock(trace_mu_);
    op_counts_.clear();
    weights_used_.clear();
}
uint32_t Session::n_ctx_seq() const { return n_ctx_seq_; }
uint32_t Session::n_batch() const { return llama_n_batch(ctx_); }
uint32_t Session::n_seq_max() const { return n_seq_max_; }

void Session::set_sampler(int32_t seq, const SamplingParams & params, const std::vector<int32_t> & history) {
    if (seq < 0 || static_cast<uint32_t>(seq) >= n_seq_max()) {
        throw std::invalid_argument("sequence id out of range");
    }
    samplers_[seq] = std::make_unique<SeqSampler>(model_->raw(), params, history);
    n_probs_[seq] = params.n_probs;
    preserved_[seq] = params.preserved_tokens;
    std::sort(preserved_[seq].begin(), preserved_[seq].end());
    stop_watch_.erase(seq);
    StopWatch watch;
    for (const std::string & stop : params.stop) {
        if (!stop.empty()) {
            watch.stops.push_back(stop);
            watch.keep = std::max(watch.keep, stop.size() - 1);
        }
    }
    if (!watch.stops.empty()) {
        stop_watch_[seq] = std::move(watch);
    }
}

void Session::drop_sampler(int32_t seq) {
    samplers_.erase(seq);
    n_probs_.erase(seq);
    preserved_.erase(seq);
    stop_watch_.erase(seq);
}

bool Session::watch_stops(int32_t seq, const std::string & piece) {
    auto it = stop_watch_.find(seq);
    if (it == stop_watch_.end()) {
        return false;
    }
    StopWatch & w = it->second;
    // UTF-8 never matches inside another character, so a byte search finds what a text search does
    const std::string text = w.tail + piece;
    const bool hit = std::any_of(w.stops.begin(), w.stops.end(),
                                 [&](const std::string & stop) { return text.find(stop) != std::string::npos; });
    w.tail = text.size() > w.keep ? text.substr(text.size() - w.keep) : text;
    return hit;
}

namespace {

// log-softmax of the raw logits row: the model's own distribution, before any sampler.
void logprobs_of(const float * logits, int32_t n_vocab, int32_t chosen, int32_t n_top, float & chosen_lp,
                 std::vector<std::pair<int32_t, float>> & top) {
    float max_l = -INFINITY;
    for (int32_t i = 0; i < n_vocab; ++i) {
        max_l = std::max(max_l, logits[i]);
    }
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        sum += std::exp(static_cast<double>(logits[i] - max_l));
    }
    const float log_z = max_l + static_cast<float>(std::log(sum));
    chosen_lp = logits[chosen] - log_z;
    top.clear();
    if (n_top <= 0) {
        return;
    }
    std::vector<int32_t> idx(n_vocab);
    std::iota(idx.begin(), idx.end(), 0);
    const int32_t k = std::min(n_top, n_vocab);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
        return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int32_t i = 0; i < k; ++i) {
        top.emplace_back(idx[i], logits[idx[i]] - log_z);
    }
}

}  // namespace

StepOutput Session::step(const std::vector<int32_t> & tokens, const std::vector<int32_t> & pos,
                         const std::vector<int32_t> & seq_ids, const std::vector<uint8_t> & want_sample) {
    const size_t n = tokens.size();
    if (pos.size() != n || seq_ids.size() != n || want_sample.size() != n) {
        throw std::invalid_argument("step: tokens, pos, seq_ids and want_sample must have the same length");
    }
    if (n == 0 || n > n_batch()) {
        throw std::invalid_argument("step: batch must hold 1..n_batch tokens");
    }
    StepOutput out;
    llama_batch batch = llama_batch_init(static_cast<int32_t>(n), 0, 1);
    for (size_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= model_->info().n_vocab) {
            llama_batch_free(batch);
            throw std::invalid_argument("step: token id outside the vocabulary");
        }
        batch.token[i] = tokens[i];
        batch.pos[i] = pos[i];
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = seq_ids[i];
        batch.logits[i] = want_sample[i] ? 1 : 0;
    }
    batch.n_tokens = static_cast<int32_t>(n);
    const int32_t rc = llama_decode(ctx_, batch);
    llama_batch_free(batch);
    if (rc == 1) {
        out.status = 1;
        return out;
    }
    if (rc != 0) {
        throw EngineError("llama_decode failed with code " + std::to_string(rc));
    }
    const int32_t n_vocab = model_->info().n_vocab;
    for (size_t i = 0; i < n; ++i) {
        if (!want_sample[i]) {
            continue;
        }
        const int32_t seq = seq_ids[i];
        auto it = samplers_.find(seq);
        if (it == samplers_.end()) {
            throw std::invalid_argument("step: no sampler set for sequence " + std::to_string(seq));
        }
        const int32_t idx = static_cast<int32_t>(i);
        const int32_t tok = it->second->sample_and_accept(ctx_, idx);
        const bool eog = model_->is_eog(tok);
        const auto & keep = preserved_[seq];
        const bool special = std::binary_search(keep.begin(), keep.end(), tok);
        out.seq_ids.push_back(seq);
        out.tokens.push_back(tok);
        out.eog.push_back(eog ? 1 : 0);
        out.pieces.push_back(eog ? std::string() : model_->piece(tok, special));
        out.stopped.push_back(watch_stops(seq, out.pieces.back()) ? 1 : 0);
        const int32_t n_probs = n_probs_[seq];
        float lp = 0.0f;
        std::vector<std::pair<int32_t, float>> top;
        if (n_probs > 0) {
            logprobs_of(llama_get_logits_ith(ctx_, idx), n_vocab, tok, n_probs, lp, top);
        }
        out.logprobs.push_back(lp);
        out.top.push_back(std::move(top));
    }
    return out;
}

StepOutput Session::run(std::vector<int32_t> tokens, std::vector<int32_t> pos, const std::vector<int32_t> & seq_ids,
                        std::vector<int32_t> remaining, const std::vector<uint8_t> & stop_on_eog, int32_t max_steps) {
    const size_t n = tokens.size();
    if (pos.size() != n || seq_ids.size() != n || remaining.size() != n || stop_on_eog.size() != n) {
        throw std::invalid_argument("run: tokens, pos, seq_ids, remaining and stop_on_eog must have the same length");
    }
    if (max_steps < 1) {
        throw std::invalid_argument("run: max_steps must be at least 1");
    }
    const std::vector<uint8_t> want(n, 1);
    StepOutput out;
    for (int32_t s = 0; s < max_steps; ++s) {
        if (s > 0 && interrupt_.load(std::memory_order_acquire)) {
            break;
        }
        StepOutput one;
        try {
            one = step(tokens, pos, seq_ids, want);
        } catch (const std::exception & e) {
            if (s == 0) {
                throw;
            }
            out.error = e.what();  // the steps done stand: their tokens are in memory and in the rows
            break;
        }
        if (one.status != 0) {
            if (s == 0) {
                out.status = one.status;
            }
            break;
        }
        bool end = false;
        for (size_t i = 0; i < n; ++i) {
            tokens[i] = one.tokens[i];
            ++pos[i];
            --remaining[i];
            end = end || remaining[i] <= 0 || (one.eog[i] != 0 && stop_on_eog[i] != 0) || one.stopped[i] != 0;
        }
        auto take = [](auto & to, auto & from) { std::move(from.begin(), from.end(), std::back_inserter(to)); };
        take(out.seq_ids, one.seq_ids);
        take(out.tokens, one.tokens);
        take(out.eog, one.eog);
        take(out.pieces, one.pieces);
        take(out.logprobs, one.logprobs);
        take(out.top, one.top);
        take(out.stopped, one.stopped);
        ++out.steps;
        if (end) {
            break;
        }
    }
    return out;
}

bool Session::seq_rm(int32_t seq, int32_t p0, int32_t p1) { return compat::seq_rm(ctx_, seq, p0, p1); }
void Session::seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1) { compat::seq_cp(ctx_, src, dst, p0, p1); }
void Session::seq_keep(int32_t seq) { compat::seq_keep(ctx_, seq); }
void Session::seq_add(int32_t seq, int32_t p0, int32_t p1, int32_t delta) {
    if (!compat::can_shift(ctx_)) {
        throw std::invalid_argument("this model's memory cannot shift positions (context shift unsupported)");
    }
    compat::seq_add(ctx_, seq, p0, p1, delta);
}
int32_t Session::seq_pos_max(int32_t seq) const { return compat::seq_pos_max(ctx_, seq); }
int32_t Session::seq_pos_min(int32_t seq) const { return compat::seq_pos_min(ctx_, seq); }
int32_t Session::n_swa() const { return compat::n_swa(llama_get_model(ctx_)); }
bool Session::checkpoints_supported() const { return compat::checkpoints_supported(); }
std::vector<uint8_t> Session::checkpoint_save(int32_t seq, bool partial) {
    return compat::checkpoint_save(ctx_, seq, partial);
}
bool Session::checkpoint_load(int32_t seq, const uint8_t * data, size_t size, bool partial) {
    return compat::checkpoint_load(ctx_, seq, data, size, partial);
}
void Session::clear() { compat::memory_clear(ctx_); }
bool Session::can_shift() const { return compat::can_shift(ctx_); }
int32_t Session::graphs_reused() const { return compat::graphs_reused(ctx_); }

std::vector<float> Session::embed(const std::vector<int32_t> & tokens, bool normalize) {
    if (tokens.empty()) {
        throw std::invalid_argument("embed: empty input");
    }
    if (tokens.size() > n_batch()) {
        throw std::invalid_argument("embed: input of " + std::to_string(tokens.size()) +
                                    " tokens exceeds the batch size " + std::to_string(n_batch()));
    }
    compat::memory_clear(ctx_);
    const size_t n = tokens.size();
    llama_batch batch = llama_batch_init(static_cast<int32_t>(n), 0, 1);
    for (size_t i = 0; i < n; ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = static_cast<int32_t>(i);
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = static_cast<int32_t>(n);
    const bool has_encoder = model_->info().has_encoder;
    const int32_t rc = has_encoder ? llama_encode(ctx_, batch) : llama_decode(ctx_, batch);
    llama_batch_free(batch);
    if (rc != 0) {
        throw EngineError("embedding decode failed with code " + std::to_string(rc));
    }
    const int32_t n_embd = model_->info().n_embd;
    std::vector<float> out(static_cast<size_t>(n_embd), 0.0f);
    if (llama_pooling_type(ctx_) == LLAMA_POOLING_TYPE_NONE) {
        // The model pools nothing: mean of the token embeddings, as OpenAI-style APIs need one vector.
        for (size_t i = 0; i < n; ++i) {
            const float * e = llama_get_embeddings_ith(ctx_, static_cast<int32_t>(i));
            for (int32_t d = 0; d < n_embd; ++d) {
                out[d] += e[d] / static_cast<float>(n);
            }
        }
    } else {
        const float * e = llama_get_embeddings_seq(ctx_, 0);
        if (e == nullptr) {
            throw EngineError("the model produced no pooled embedding");
        }
        std::copy(e, e + n_embd, out.begin());
    }
    compat::memory_clear(ctx_);
    if (normalize) {
        double norm = 0.0;
        for (float v : out) {
            norm += static_cast<double>(v) * v;
        }
        norm = std::sqrt(norm);
        if (norm > 0.0) {
            for (float & v : out) {
                v = static_cast<float>(v / norm);
            }
        }
    }
    return out;
}

}  // namespace PYLOCALAI_ENGINE_NS
