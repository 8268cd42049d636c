// DOM building that never parses text as HTML: user text goes in through text nodes and checked attributes.

/** Creates `tag` with properties from `props` (className, textContent, dataset, attributes) and children. */
export function el(tag, props = {}, children = []) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) {
      continue;
    }
    if (name === "className") {
      element.className = value;
    } else if (name === "text") {
      element.textContent = value;
    } else if (name === "dataset") {
      Object.assign(element.dataset, value);
    } else if (name === "attrs") {
      for (const [attribute, attributeValue] of Object.entries(value)) {
        element.setAttribute(attribute, attributeValue);
      }
    } else {
      element[name] = value;
    }
  }
  for (const child of children) {
    element.append(child);
  }
  return element;
}

const URL_PATTERN = /\bhttps?:\/\/[^\s<>"]+/gi;
const TRAILING_PUNCTUATION = /[.,;:!?'")\]}>。，；：！？、）」』】]+$/u;

/**
 * Splits `text` into plain parts and http(s) links: [{text}, {text, href}, …]. Trailing punctuation stays
 * outside a link, except a closing bracket that matches an opening one inside it, as in Wikipedia URLs.
 */
export function splitLinks(text) {
  const parts = [];
  let last = 0;
  for (const match of text.matchAll(URL_PATTERN)) {
    let candidate = match[0];
    const trailing = candidate.match(TRAILING_PUNCTUATION);
    if (trailing) {
      let cut = trailing[0];
      if (cut.startsWith(")") && countOf(candidate, "(") > countOf(candidate.slice(0, -cut.length), ")")) {
        cut = cut.slice(1);
      }
      candidate = candidate.slice(0, candidate.length - cut.length);
    }
    const href = safeHref(candidate);
    if (!href) {
      continue;
    }
    if (match.index > last) {
      parts.push({ text: text.slice(last, match.index) });
    }
    parts.push({ text: candidate, href });
    last = match.index + candidate.length;
  }
  if (last < text.length) {
    parts.push({ text: text.slice(last) });
  }
  return parts;
}

function countOf(text, character) {
  return text.split(character).length - 1;
}

/** Returns the normalised URL when `candidate` parses as http or https, else null. */
export function safeHref(candidate) {
  try {
    const url = new URL(candidate);
    if ((url.protocol === "http:" || url.protocol === "https:") && url.hostname) {
      return url.href;
    }
  } catch {
    return null;
  }
  return null;
}

/** Builds a fragment showing `text` with its http(s) URLs as links that open in a new tab without a referrer. */
export function renderBody(text) {
  const fragment = document.createDocumentFragment();
  for (const part of splitLinks(text)) {
    if (part.href) {
      fragment.append(
        el("a", {
          href: part.href,
          text: part.text,
          attrs: { rel: "noopener noreferrer", target: "_blank" },
        }),
      );
    } else {
      fragment.append(document.createTextNode(part.text));
    }
  }
  return fragment;
}
