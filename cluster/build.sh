#!/usr/bin/env bash
# Build and push the dino-ray image under a tag that changes with the code, then pin every manifest in
# cluster/ to exactly what was pushed (tag and digest), so each pod runs the code of one known commit.
#
#   cluster/build.sh REGISTRY/NAME            # e.g. cluster/build.sh ghcr.io/acme/dino-ray
#   cluster/build.sh --pin IMAGE_REFERENCE    # an image your CI built: only rewrite the manifests
#
# Tag: <project version>-ray<Ray version>-<first 12 hex digits of the commit>, for example
# 0.1.0-ray2.60.0-1a2b3c4d5e6f. The build passes --build-arg GIT_COMMIT=<full hash>, which the image
# keeps as DINO_RAY_GIT_COMMIT for the MLflow runs it produces. A tree with uncommitted changes in what
# the image contains is refused: the image would claim a commit that does not hold its code. The
# PostgreSQL image of mlflow.yaml is pinned to the digest its tag points at today.
#
# Needs git, sed and docker logged in to the registry (DOCKER=podman for podman).
set -euo pipefail
cd "$(dirname "$0")/.."

docker=${DOCKER:-docker}
manifests=(cluster/*.yaml cluster/jobs/*.yaml)
# What cluster/Dockerfile copies into the image.
image_inputs=(pyproject.toml README.md requirements dino_ray jobs .dockerignore cluster/Dockerfile cluster/prepare_demo_data.py)
usage="usage: cluster/build.sh REGISTRY/NAME   or   cluster/build.sh --pin IMAGE_REFERENCE"

die() {
  echo "cluster/build.sh: $*" >&2
  exit 1
}

# The project image the manifests use now (tools/check_cluster.py keeps them all equal to this one).
current_image() {
  sed -n 's/^ *image: &image \([^ ]*\).*/\1/p' cluster/raycluster.yaml | head -n 1
}

# replace_everywhere OLD NEW: a literal replacement in every manifest (sed -i.bak works on GNU and BSD).
replace_everywhere() {
  local old new f
  old=$(printf '%s' "$1" | sed 's/[][\.*^$#]/\\&/g')
  new=$(printf '%s' "$2" | sed 's/[\&#]/\\&/g')
  sed -i.bak "s#${old}#${new}#g" "${manifests[@]}"
  for f in "${manifests[@]}"; do rm -f "$f.bak"; done
}

pin() {
  local old
  old=$(current_image)
  [ -n "$old" ] || die "no 'image: &image ...' line in cluster/raycluster.yaml"
  [ "$old" = "$1" ] || replace_everywhere "$old" "$1"
  echo "manifests now run $1"
}

# The digest a pushed or pulled image reference resolves to (sha256:...).
digest_of() {
  $docker inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$1" | sed -n 's/^[^@]*@//p' | head -n 1
}

pin_postgres() {
  local current tag digest
  current=$(sed -n 's/^ *image: \(postgres:[^ ]*\).*/\1/p' cluster/mlflow.yaml | head -n 1)
  [ -n "$current" ] || return 0
  tag=${current%%@*}
  $docker pull -q "$tag" > /dev/null
  digest=$(digest_of "$tag")
  [ -n "$digest" ] || die "could not read the digest of $tag"
  [ "$current" = "$tag@$digest" ] || replace_everywhere "$current" "$tag@$digest"
  echo "mlflow.yaml now runs $tag@$digest"
}

if [ "${1:-}" = "--pin" ]; then
  [ $# -eq 2 ] || die "$usage"
  pin "$2"
  exit 0
fi
[ $# -eq 1 ] && [ "${1#-}" = "$1" ] || die "$usage"
repo=$1
case ${repo##*/} in
  *:* | *@*) die "give the repository without a tag or digest (got $repo); the tag is computed" ;;
esac

dirty=$(git status --porcelain -- "${image_inputs[@]}")
[ -z "$dirty" ] || die "commit these first; the image records the commit it was built from:
$dirty"
commit=$(git rev-parse HEAD)
version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
ray=$(sed -n 's/^ARG RAY_VERSION=\([^ ]*\).*/\1/p' cluster/Dockerfile | head -n 1)
[ -n "$version" ] && [ -n "$ray" ] || die "could not read the version from pyproject.toml or RAY_VERSION from cluster/Dockerfile"
image="$repo:$version-ray$ray-${commit:0:12}"

$docker build -f cluster/Dockerfile --build-arg GIT_COMMIT="$commit" -t "$image" .
if [ "$(basename "$docker")" = podman ]; then
  digest_file=$(mktemp)
  podman push --digestfile "$digest_file" "$image"
  digest=$(cat "$digest_file")
  rm -f "$digest_file"
else
  $docker push "$image"
  digest=$(digest_of "$image")
fi
[ -n "$digest" ] || die "pushed $image but could not read its digest; pin it yourself: cluster/build.sh --pin $image@sha256:..."
pin "$image@$digest"
pin_postgres
echo "next: python tools/check_cluster.py cluster/   (cluster/README.md, step 2)"
