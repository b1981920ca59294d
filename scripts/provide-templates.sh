#!/usr/bin/env bash
# Builds the provided templates on a running server, as the operator, so that every tenant
# sees them: `python` (Debian's python3 and pip) and `bash` (bash and /home/user). Each is
# defined in templates/NAME.toml over a catalog image built from Debian's packages:
#
#   template  catalog image   root filesystem built by
#   python    debian-python   scripts/build-python-image.sh (debootstrap; cached)
#   bash      e2b-base        scripts/build-e2b-image.sh
#
#   scripts/provide-templates.sh [--python-tar TAR] [--bash-tar TAR] [NAME...]   (default: python bash)
#
# Reads STACYVM_URL and STACYVM_API_KEY (an admin key); runs the CLI from STACYVM_BIN (default
# target/release/stacyvm, else target/debug/stacyvm). A catalog image that already exists is
# kept, and a template that already has a ready version is not built again: reruns are quick.
# To rebuild one: `stacyvm template rm NAME && stacyvm image rm IMAGE`, then run this again.
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib.sh
. "$root_dir/scripts/lib.sh"

python_tar=""
bash_tar=""
names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python-tar) python_tar="$2"; shift 2 ;;
    --bash-tar) bash_tar="$2"; shift 2 ;;
    -*) echo "provide-templates: unknown option $1" >&2; exit 2 ;;
    *) names+=("$1"); shift ;;
  esac
done
[ "${#names[@]}" -gt 0 ] || names=(python bash)
url="${STACYVM_URL:?set STACYVM_URL to the server}"
key="${STACYVM_API_KEY:?set STACYVM_API_KEY to an admin key}"
bin="${STACYVM_BIN:-}"
if [ -z "$bin" ]; then
  for b in "$root_dir/target/release/stacyvm" "$root_dir/target/debug/stacyvm"; do
    [ -x "$b" ] && { bin="$b"; break; }
  done
fi
[ -n "$bin" ] && [ -x "$bin" ] || { echo "provide-templates: no stacyvm binary (set STACYVM_BIN)" >&2; exit 1; }

# Whether GET PATH answers 200.
exists() {
  curl -fsS -o /dev/null -H "Authorization: Bearer $key" "$url$1" 2>/dev/null
}

# import_image NAME TAR — puts TAR into the catalog as NAME unless NAME is there.
import_image() {
  if exists "/v1/images/$1"; then
    return 0
  fi
  curl -fsS -o /dev/null -H "Authorization: Bearer $key" -X POST "$url/v1/images?name=$1" \
    -H 'Content-Type: application/x-tar' --data-binary @"$2" || {
    echo "provide-templates: importing $2 as the image $1 failed" >&2
    return 1
  }
  log "imported the image $1 into the catalog"
}

# ready NAME — whether the template NAME has a ready version.
ready() {
  local state
  state="$(curl -fsS -H "Authorization: Bearer $key" "$url/v1/templates/$1" 2>/dev/null |
    sed -n 's/.*"state":"\([a-z]*\)".*/\1/p')" || state=""
  [ "$state" = ready ]
}

# provide NAME IMAGE TAR — builds the template NAME from templates/NAME.toml.
provide() {
  local name="$1" image="$2" tar="$3"
  import_image "$image" "$tar"
  log "building the $name template (templates/$name.toml)"
  STACYVM_URL="$url" STACYVM_API_KEY="$key" "$bin" template build "$name" -f "$root_dir/templates/$name.toml" >&2
}

for name in "${names[@]}"; do
  if ready "$name"; then
    log "the $name template is ready"
    continue
  fi
  case "$name" in
    python)
      [ -n "$python_tar" ] || python_tar="$("$root_dir/scripts/build-python-image.sh")"
      provide python debian-python "$python_tar"
      ;;
    bash)
      [ -n "$bash_tar" ] || bash_tar="$("$root_dir/scripts/build-e2b-image.sh")"
      provide bash e2b-base "$bash_tar"
      ;;
    *) echo "provide-templates: no provided template $name (python, bash)" >&2; exit 2 ;;
  esac
done
