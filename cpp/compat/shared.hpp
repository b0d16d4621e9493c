// Pieces both compat layers use whose calls have the same names and meaning in every fork: included
// by compat/upstream.cpp and compat/ik.cpp, each compiled against its own fork's headers.
#pragma once

#include "compat/compat.hpp"
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace PYLOCALAI_ENGINE_NS {
namespace compat {

// Parsed chat templates, one per (model, override source): parsing a jinja template costs far more
// than rendering it. Entries go when their model is freed.
template <typename T>
class PerModelCache {
  public:
    template <typename Make>
    const T & get(const llama_model * model, const std::string & key, Make make) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto k = std::make_pair(model, key);
        auto it = entries_.find(k);
        if (it == entries_.end()) {
            it = entries_.emplace(k, make()).first;
        }
        return it->second;
    }

    void forget(const llama_model * model) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto it = entries_.begin(); it != entries_.end();) {
            it = it->first.first == model ? entries_.erase(it) : std::next(it);
        }
    }

  private:
    std::mutex mutex_;
    std::map<std::pair<const llama_model *, std::string>, T> entries_;
};

// The KV cache type called `name` (ggml's own type names: f16, q8_0, ...).
inline ggml_type ggml_type_from_name(const std::string & name) {
    for (int i = 0; i < GGML_TYPE_COUNT; ++i) {
        const auto t = static_cast<ggml_type>(i);
        const char * tn = ggml_type_name(t);
        if (tn != nullptr && name == tn) {
            return t;
        }
    }
    throw std::invalid_argument("unknown KV cache type '" + name + "'");
}

// The model params' tensor_split: `split` (which must outlive the load) filled from the user's
// proportions, or nullptr when none were given.
inline const float * tensor_split_into(const std::vector<float> & proportions, std::vector<float> & split) {
    split.assign(llama_max_devices(), 0.0f);
    if (proportions.empty()) {
        return nullptr;
    }
    if (proportions.size() > split.size()) {
        throw std::invalid_argument("tensor_split has more entries than this build supports devices");
    }
    std::copy(proportions.begin(), proportions.end(), split.begin());
    return split.data();
}

// Greedy decoding's token: the first maximum of the logits row among tokens not banned (banned[t] != 0;
// end-of-generation tokens under ignore_eos), as llama.cpp's greedy sampler picks it; -1 when no logit
// is above -inf (NaN weights). The maximum is taken over 16 independent lanes, which the compiler
// turns into vector max instructions (a scan with the index and the ban in its loop is scalar: about
// 1 ns a token of the vocabulary, 0.26 ms a step for Gemma 3's 262,144); a second pass finds its first
// index. Only when that token is banned does it fall back to the scalar scan.
inline int32_t greedy_token(const float * logits, int32_t n_vocab, const uint8_t * banned) {
    constexpr int L = 16;
    float lane[L];
    std::fill(lane, lane + L, -INFINITY);
    int32_t t = 0;
    for (; t + L <= n_vocab; t += L) {
        for (int j = 0; j < L; ++j) {
            lane[j] = logits[t + j] > lane[j] ? logits[t + j] : lane[j];  // a NaN never wins, as with '>'
        }
    }
    float best_logit = -INFINITY;
    for (; t < n_vocab; ++t) {
        best_logit = logits[t] > best_logit ? logits[t] : best_logit;
    }
    for (int j = 0; j < L; ++j) {
        best_logit = lane[j] > best_logit ? lane[j] : best_logit;
    }
    if (!(best_logit > -INFINITY)) {
        return -1;
    }
    for (t = 0; t < n_vocab; ++t) {
        if (logits[t] == best_logit) {
            if (!banned[t]) {
                return t;
            }
            break;  // the maximum is banned: the best allowed token needs the full scan
        }
    }
    int32_t best = -1;
    best_logit = -INFINITY;
    for (t = 0; t < n_vocab; ++t) {
        if (!banned[t] && logits[t] > best_logit) {
            best_logit = logits[t];
            best = t;
        }
    }
    return best;
}

// The ModelInfo fields whose calls are the same in every fork.
inline void fill_shared_model_info(const llama_model * model, ModelInfo & info) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    char buf[512];
    llama_model_desc(model, buf, sizeof(buf));
    info.description = buf;
    info.n_vocab = llama_vocab_n_tokens(vocab);
    info.n_embd = llama_model_n_embd(model);
    info.n_params = llama_model_n_params(model);
    info.size_bytes = llama_model_size(model);
    info.bos = llama_vocab_bos(vocab);
    info.eos = llama_vocab_eos(vocab);
    info.add_bos = llama_vocab_get_add_bos(vocab);
}

}  // namespace compat
}  // namespace PYLOCALAI_ENGINE_NS
