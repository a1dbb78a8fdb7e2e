#!/usr/bin/env bash
# Regenerates the demo origin's committed HLS fixture: 8 s of a 320x180 moving test picture,
# H.264 Constrained Baseline (avc1.42E01E, which every browser decodes), about 100 kbit/s, cut
# into four 2 s MPEG-TS segments (one keyframe each). Needs ffmpeg with libx264; the output is
# committed so that builds and tests never need ffmpeg.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
command -v ffmpeg >/dev/null || { echo "make.sh: ffmpeg is required" >&2; exit 1; }
rm -f segment*.ts fixture.m3u8
ffmpeg -hide_banner -loglevel error -y \
  -f lavfi -i "testsrc2=size=320x180:rate=25:duration=8" \
  -c:v libx264 -profile:v baseline -level 3.0 -pix_fmt yuv420p \
  -b:v 100k -maxrate 120k -bufsize 200k \
  -g 50 -keyint_min 50 -sc_threshold 0 -bf 0 \
  -x264-params "bframes=0:scenecut=0" -flags +bitexact -fflags +bitexact \
  -f hls -hls_time 2 -hls_playlist_type vod -hls_list_size 0 \
  -hls_segment_filename 'segment%d.ts' fixture.m3u8
# The origin writes its own playlists; this one only shows what ffmpeg produced.
cat fixture.m3u8
rm fixture.m3u8
ls -l segment*.ts
