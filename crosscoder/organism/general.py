"""The organism's general text: the Python documentation that ships with Python (``pydoc_data.topics``, about
465k characters), so the base model is pretrained without any download."""

from __future__ import annotations


def general_documents(max_chars: int = 800) -> list[str]:
    """The Python documentation in ``pydoc_data.topics``, cut into documents of whole paragraphs of at most
    about ``max_chars`` characters (a longer paragraph is a document of its own), in a fixed order.

    The text is that of the running Python's documentation, so it can differ between Python versions."""
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        paragraphs = [paragraph.strip() for paragraph in topics[name].split("\n\n") if paragraph.strip()]
        current: list[str] = []
        for paragraph in paragraphs:
            if current and sum(len(part) + 2 for part in current) + len(paragraph) > max_chars:
                documents.append("\n\n".join(current))
                current = []
            current.append(paragraph)
        if current:
            documents.append("\n\n".join(current))
    return documents
