"""Dataset tools for LLaVA JSON data; each is a command, `python -m data_tools.<name> --help`.

validate       structure, images, <image> markers, duplicates, token lengths; --write-clean
filter         keep/drop samples by source (prepare: the same with the remote-sensing defaults)
partition      train/val/test split grouped by image (same file, same bytes, near duplicates)
check_leakage  audit splits made elsewhere for pictures shared across splits
convert        VQA JSON/CSV, COCO captions, parquet/arrow with embedded images -> LLaVA JSON
synthesize     the demo's coloured-shapes VQA + caption set, deterministic and balanced
stats          per split and per source counts, length histograms, question types
"""
