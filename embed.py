"""Caches a CLIP's embeddings of its data set, so the prior and decoder never run CLIP.

  python embed.py --clip_workdir runs/shapes_clip --cache_dir runs/shapes_clip/cache \
      [--splits train,validation,heldout] [--num_examples N] [--batch_size 256]

The CLIP is trained (train.py) or imported (convert_clip.py). The data set is its workdir's `data`
block (shapes, a TFDS / captioned-folder data set, or WebDataset tar shards); images are
preprocessed as that CLIP expects (an imported CLIP's own resize, crop, mean and std). Unreadable
examples (corrupt images, empty captions) are skipped and counted. Re-running the same command
resumes an interrupted cache (complete chunks are kept). A cache built from another CLIP (or step,
or size) is never overwritten: pick another --cache_dir.
"""
import sys

from absl import app, flags

from unclip_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("clip_workdir", None, "Workdir of a trained CLIP (python train.py --config ...:clip) "
                    "or an imported one (python convert_clip.py).")
flags.DEFINE_string("cache_dir", None, "Where the cache goes: <cache_dir>/<split>/.")
flags.DEFINE_list("splits", ["train", "validation", "heldout"],
                  "Splits to cache (splits the data set lacks are skipped).")
flags.DEFINE_integer("num_examples", None, "At most this many examples per split (default: all).")
flags.DEFINE_integer("batch_size", 256, "Encoder batch size (all local devices together).")
flags.DEFINE_integer("chunk_size", 1024, "Examples per chunk file (the unit of resuming).")
flags.DEFINE_enum("text_hidden_dtype", "float16", ["float16", "float32"],
                  "Storage dtype of the text tower's hidden states.")
flags.DEFINE_integer("step", None, "CLIP checkpoint step (default: the latest).")
flags.mark_flags_as_required(["clip_workdir", "cache_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.start()
    import jax

    from unclip_jax.data import embedding_cache
    from unclip_jax.data import embed

    from unclip_jax.stages.load import NotTrainedError

    try:
        summaries = embed.build_clip_cache(
            FLAGS.clip_workdir, FLAGS.cache_dir, FLAGS.splits, num_examples=FLAGS.num_examples,
            batch_size=FLAGS.batch_size, chunk_size=FLAGS.chunk_size,
            text_hidden_dtype=FLAGS.text_hidden_dtype, step=FLAGS.step, progress=True)
    except (NotTrainedError, embedding_cache.CacheMismatchError, FileNotFoundError) as e:
        sys.exit(f"embed.py: {e}")  # The user's input is wrong: the message says how, no traceback.
    if jax.process_index() == 0:
        print(f"Embedding cache in {FLAGS.cache_dir}:")
        by = ", counting process 0's share" if jax.process_count() > 1 else ""
        for split, mine in summaries.items():
            s = embedding_cache.summarize(FLAGS.cache_dir, split)
            m = s["metadata"]
            print(f"  {split}: {s['num_valid']} of {s['num_examples']} examples cached "
                  f"({s['num_invalid']} unreadable skipped) in {s['num_chunks']} chunks "
                  f"({mine.chunks_written} written now, {mine.chunks_skipped} already there{by}); "
                  f"CLIP step {m['clip_step']}, D={m['embed_dim']} L={m['context_length']} "
                  f"W={m['text_width']}")


if __name__ == "__main__":
    app.run(main)
