// Multimodal input through llama.cpp's multimodal library (libmtmd): a projector file (mmproj) turns
// images into embeddings that are decoded into a sequence's KV cache like prompt tokens.
// Built for every fork whose tree has libmtmd (PYLOCALAI_HAS_MTMD): tools/mtmd upstream,
// examples/mtmd in ik_llama.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine_api.hpp"

struct mtmd_context;
struct mtmd_input_chunk;

namespace PYLOCALAI_ENGINE_NS {

// One media item of a prompt, ready to encode: n_tokens embeddings taking n_pos positions
// (n_pos differs from n_tokens only for M-RoPE models). id names the content (SHA-256 of the file).
struct MediaChunk {
    std::shared_ptr<mtmd_input_chunk> chunk;
    int32_t n_tokens = 0;
    int32_t n_pos = 0;
    std::string id;
    bool audio = false;
};

// A tokenized multimodal prompt: text pieces and media items in prompt order.
struct MediaSegment {
    std::vector<int32_t> tokens;       // a text piece (empty for media)
    std::shared_ptr<MediaChunk> media;  // a media item (null for text)
};

struct ProjectorParams {
    std::string path;
    bool use_gpu = true;
    int32_t n_threads = -1;
    int32_t image_min_tokens = -1;  // -1: the projector's own default
    int32_t image_max_tokens = -1;
    bool warmup = true;
};

class Projector {
public:
    Projector(std::shared_ptr<Model> model, const ProjectorParams & params);
    ~Projector();
    Projector(const Projector &) = delete;
    Projector & operator=(const Projector &) = delete;

    bool vision() const;
    bool audio() const;
    std::string marker() const;  // the text that stands for one media file in a prompt

    // Split prompt at its markers and decode each file (image: PNG, JPEG, BMP, GIF...; audio: WAV,
    // MP3, FLAC), one per marker, in order. Throws std::invalid_argument on the caller's errors.
    std::vector<MediaSegment> tokenize(const std::string & prompt, const std::vector<std::string> & files,
                                       bool add_special, bool parse_special) const;

    // Encode one media item and decode its embeddings into seq of session, at positions from pos.
    // Returns the next free position. The caller owns the session's thread.
    int32_t eval(Session & session, const MediaChunk & media, int32_t seq, int32_t pos);

private:
    std::shared_ptr<Model> model_;
    mtmd_context * ctx_ = nullptr;
    mutable std::mutex mu_;  // encoding keeps per-context state; tokenizing only reads (ik: guarded too)
};

}  // namespace PYLOCALAI_ENGINE_NS
