/** A dependency-free SVG line chart for the demo's loss curves. */

export interface Series {
  name: string;
  /** [x, y] points. */
  points: Array<[number, number]>;
  color: string;
}

function escapeXml(text: string): string {
  return text.replace(/&/g, '&amp;')
      .replace(/</g, '&lt;')
      .replace(/>/g, '&gt;')
      .replace(/"/g, '&quot;');
}

/** An SVG document plotting the series on shared axes. */
export function lineChartSvg(
    title: string, xLabel: string, yLabel: string, series: Series[], width = 720,
    height = 420): string {
  const all =
      series.flatMap(s => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  if (all.length === 0) {
    throw new Error('lineChartSvg: no finite points to plot');
  }
  const margin = {left: 64, right: 24, top: 40, bottom: 52};
  const xMin = Math.min(...all.map(p => p[0]));
  const xMax = Math.max(...all.map(p => p[0]));
  const yMin = Math.min(...all.map(p => p[1]));
  const yMax = Math.max(...all.map(p => p[1]));
  const xSpan = xMax - xMin || 1;
  const ySpan = yMax - yMin || 1;
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const sx = (x: number) => margin.left + (x - xMin) / xSpan * plotW;
  const sy = (y: number) => margin.top + (1 - (y - yMin) / ySpan) * plotH;
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${
        width} ${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="${width / 2}" y="24" text-anchor="middle" font-size="15">${escapeXml(title)}</text>`,
    `<line x1="${margin.left}" y1="${margin.top + plotH}" x2="${margin.left + plotW}" y2="${
        margin.top + plotH}" stroke="black"/>`,
    `<line x1="${margin.left}" y1="${margin.top}" x2="${margin.left}" y2="${
        margin.top + plotH}" stroke="black"/>`,
  ];
  for (let i = 0; i <= 4; i++) {
    const y = yMin + ySpan * i / 4;
    const x = xMin + xSpan * i / 4;
    parts.push(
        `<text x="${margin.left - 6}" y="${sy(y) + 4}" text-anchor="end">${y.toFixed(2)}</text>`,
        `<line x1="${margin.left}" y1="${sy(y)}" x2="${margin.left + plotW}" y2="${
            sy(y)}" stroke="#ddd"/>`,
        `<text x="${sx(x)}" y="${margin.top + plotH + 16}" text-anchor="middle">${
            Math.round(x)}</text>`);
  }
  parts.push(
      `<text x="${margin.left + plotW / 2}" y="${height - 12}" text-anchor="middle">${
          escapeXml(xLabel)}</text>`,
      `<text x="16" y="${margin.top + plotH / 2}" text-anchor="middle" transform="rotate(-90 16 ${
          margin.top + plotH / 2})">${escapeXml(yLabel)}</text>`);
  series.forEach((s, i) => {
    const d =
        s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y))
            .map(([x, y], n) => `${n === 0 ? 'M' : 'L'}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`)
            .join(' ');
    parts.push(
        `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="1.5"/>`,
        `<rect x="${margin.left + plotW - 190}" y="${
            margin.top + 8 + 18 * i}" width="12" height="3" fill="${s.color}"/>`,
        `<text x="${margin.left + plotW - 172}" y="${margin.top + 13 + 18 * i}">${
            escapeXml(s.name)}</text>`);
  });
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}
