"""PDFs that break naive readers, built at test time: a decompression bomb, an AES-encrypted file, a long file."""

from __future__ import annotations

import io
import zlib

from reportlab.pdfgen import canvas


def text_pdf(*pages: str) -> bytes:
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer)
    for text in pages:
        pdf.drawString(72, 720, text)
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def decompression_bomb_pdf(inflated_bytes: int = 80_000_000) -> bytes:
    """One page whose content stream is ~80 KB of deflate that inflates past pypdf's 75 MB limit."""
    stream = zlib.compress(b" " * inflated_bytes, 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def aes_encrypted_pdf() -> bytes:
    """A PDF under the AESV2 crypt filter (empty user password), the kind pypdf needs `cryptography` to read.

    pypdf writes RC4 without extra packages; the crypt filter is then switched to AESV2, whose key check is the
    same as RC4's, so a reader accepts the password and fails only when it must decrypt with AES.
    """
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf("Secret plans, page one."))))
    writer.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    data = buffer.getvalue()
    assert b"/V 2\n/R 3\n" in data
    return data.replace(b"/V 2\n/R 3\n", b"/V 4\n/R 4\n/CF << /StdCF << /CFM /AESV2 /Length 16 >> >> "
                                         b"/StmF /StdCF /StrF /StdCF\n")
