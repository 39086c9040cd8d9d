"""split_data's helpers: reading a raw source row by row, and the course's curation of descriptions."""
