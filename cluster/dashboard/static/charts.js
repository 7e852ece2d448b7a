// Hand-written <canvas> drawing: line charts and cell grids. One canvas per picture, so a
// 58 x 256 expert grid is one bitmap rather than fifteen thousand DOM nodes.
"use strict";

const Charts = (() => {
  const PALETTE = ["#1f6feb", "#d9480f", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#e64980", "#5c7cfa",
                   "#74b816", "#868e96"];

  function shardColor(index) {
    if (index < PALETTE.length) return PALETTE[index];
    return `hsl(${(index * 137.508) % 360}, 60%, 50%)`;
  }

  // magma-like ramp from few stops: 0 -> dark, 1 -> bright
  const STOPS = [[0, [13, 8, 41]], [0.25, [84, 15, 109]], [0.5, [187, 55, 84]], [0.75, [249, 142, 9]], [1, [252, 253, 191]]];
  function heat(t) {
    t = Math.max(0, Math.min(1, t));
    for (let i = 1; i < STOPS.length; i++) {
      if (t <= STOPS[i][0]) {
        const [t0, c0] = STOPS[i - 1], [t1, c1] = STOPS[i];
        const f = (t - t0) / (t1 - t0);
        return [0, 1, 2].map(k => Math.round(c0[k] + f * (c1[k] - c0[k])));
      }
    }
    return STOPS[STOPS.length - 1][1];
  }

  function fmt(v) {
    if (v == null || !isFinite(v)) return "-";
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a >= 10) return v.toFixed(0);
    return v.toFixed(a >= 1 ? 2 : 3);
  }

  // series: [{name, color, points: [[x, y], ...]}]
  function line(canvas, title, series, xLabel) {
    const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
    const pad = {l: 48, r: 10, t: 22, b: 26};
    ctx.clearRect(0, 0, W, H);
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillStyle = "#1d2430";
    ctx.fillText(title, pad.l, 14);
    const pts = series.flatMap(s => s.points);
    if (!pts.length) {
      ctx.fillStyle = "#6b7483";
      ctx.fillText("no data yet", W / 2 - 30, H / 2);
      return;
    }
    let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
    let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
    if (x0 === x1) x1 = x0 + 1;
    if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
    const X = x => pad.l + (x - x0) / (x1 - x0) * (W - pad.l - pad.r);
    const Y = y => H - pad.b - (y - y0) / (y1 - y0) * (H - pad.t - pad.b);
    ctx.strokeStyle = "#dde1e7";
    ctx.fillStyle = "#6b7483";
    for (let i = 0; i <= 4; i++) {
      const y = y0 + (y1 - y0) * i / 4;
      ctx.beginPath(); ctx.moveTo(pad.l, Y(y)); ctx.lineTo(W - pad.r, Y(y)); ctx.stroke();
      ctx.fillText(fmt(y), 4, Y(y) + 4);
    }
    const xfmt = v => Number.isInteger(v) ? String(v) : fmt(v);
    ctx.fillText(xfmt(x0), pad.l, H - 8);
    ctx.fillText(`${xfmt(x1)} ${xLabel || ""}`, W - pad.r - 60, H - 8);
    series.forEach((s, i) => {
      ctx.strokeStyle = s.color || shardColor(i);
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      s.points.forEach(([x, y], j) => j ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y)));
      ctx.stroke();
      if (series.length > 1) {
        ctx.fillStyle = ctx.strokeStyle;
        ctx.fillText(s.name, W - pad.r - 110 + (i % 2) * 55, 14 + Math.floor(i / 2) * 12);
      }
    });
  }

  // a rows x cols grid drawn into one ImageData; colorOf(r, c) -> [r, g, b]
  function grid(canvas, rows, cols, cell, colorOf) {
    canvas.width = cols * cell.w;
    canvas.height = rows * cell.h;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(canvas.width, canvas.height), data = img.data, W = canvas.width;
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const rgb = colorOf(r, c);
        for (let dy = 0; dy < cell.h - (cell.h > 3 ? 1 : 0); dy++) {
          let o = ((r * cell.h + dy) * W + c * cell.w) * 4;
          for (let dx = 0; dx < cell.w - (cell.w > 3 ? 1 : 0); dx++, o += 4) {
            data[o] = rgb[0]; data[o + 1] = rgb[1]; data[o + 2] = rgb[2]; data[o + 3] = 255;
          }
        }
      }
    }
    ctx.putImageData(img, 0, 0);
    return ctx;
  }

  function rgbOf(css) {
    const probe = document.createElement("canvas").getContext("2d");
    probe.fillStyle = css;
    const hex = probe.fillStyle;  // normalised to #rrggbb
    return [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
  }

  return {line, grid, heat, shardColor, rgbOf, fmt};
})();
