// A small, safe Markdown renderer: it builds DOM nodes with textContent and never parses HTML, so a
// reply (or a restored conversation) cannot inject markup. Covers what chat replies use: paragraphs,
// headings, lists, fenced code, inline code, bold, italic and http(s) links.
"use strict";

const markdown = (() => {
  const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*)|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g;

  function el(tag, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function inline(parent, text) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      if (m[1]) parent.append(el("code", m[1].slice(1, -1)));
      else if (m[2]) parent.append(el("strong", m[2].slice(2, -2)));
      else if (m[3]) parent.append(el("em", m[3].slice(1, -1)));
      else {
        const a = el("a", m[4]);
        a.href = m[5];  // only http(s) URLs match
        a.rel = "noopener noreferrer";
        a.target = "_blank";
        parent.append(a);
      }
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  // Renders `text` into `parent` (its old content is replaced).
  function render(parent, text) {
    parent.replaceChildren();
    const lines = text.split("\n");
    let para = [], list = null;
    const endPara = () => {
      if (para.length) { const p = el("p"); inline(p, para.join("\n")); parent.append(p); }
      para = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      if (line.startsWith("```")) {  // fenced code, up to the closing fence (or the end, while streaming)
        endPara(); list = null;
        const code = [];
        for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
        const pre = el("pre");
        pre.append(el("code", code.join("\n")));
        parent.append(pre);
        continue;
      }
      const heading = /^(#{1,6})\s+(.*)$/.exec(line);
      const item = /^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/.exec(line);
      if (heading) {
        endPara(); list = null;
        const h = el("h" + Math.min(6, heading[1].length + 2));
        inline(h, heading[2]);
        parent.append(h);
      } else if (item) {
        endPara();
        const kind = item[1] ? "ol" : "ul";
        if (!list || list.tagName.toLowerCase() !== kind) {
          list = el(kind);
          if (item[1]) list.start = Number(item[1]);  // "2." after a paragraph continues the numbering
          parent.append(list);
        }
        const li = el("li");
        inline(li, item[2]);
        list.append(li);
      } else if (!line.trim()) {
        endPara(); list = null;
      } else if (list && /^\s/.test(line)) {  // an indented line continues the list item above
        inline(list.lastElementChild, " " + line.trim());
      } else {
        list = null;
        para.push(line);
      }
    }
    endPara();
  }

  return { render };
})();
