# cmrfed in a slim Python 3.11 image, installed the README's way (CPU build of torch first).
# Build: docker build -t cmrfed .      Run: docker run --rm -v "$PWD/out:/out" cmrfed demo --out /out/demo
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg

WORKDIR /opt/cmrfed
COPY setup.cfg pyproject.toml README.md ./
COPY cmrfed ./cmrfed
COPY data_manifests ./data_manifests

RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install . \
    && useradd --create-home cmrfed

USER cmrfed
WORKDIR /work
ENTRYPOINT ["cmrfed"]
CMD ["--help"]
