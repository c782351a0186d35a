"""Data: catalogue CSV + images -> validated rows -> TFDS dataset -> grain batches."""
